"""Nothing wrong, nothing lost: each test here failed on the code before the fix it names (issue #21)."""
from __future__ import annotations

import pytest
import torch

from mmalign.diffusion.models import tiny_components
from mmalign.train.diffusion import run
from mmalign.train.sections import load_config

CONFIGS = {"sd": "configs/tiny/diffusion_dpo.yaml", "sdxl": "configs/tiny/diffusion_dpo.yaml",
           "sd3": "configs/tiny/flow_dpo.yaml", "flux": "configs/tiny/flux_dpo.yaml"}


def diffusion_cfg(kind, out, *ov):
    return load_config(CONFIGS[kind], [f"model.kind={kind}", f"train.output_dir={out}", "train.progress=false",
                                       "validation.prompts=[]", "train.eval_every=0", *ov])


# ---------------------------------------------------------------------------------------------- 1. LoRA alpha


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux"])
def test_lora_with_alpha_not_r_loads_at_its_trained_strength(tmp_path, kind):
    """alpha = 2r: ``pipe.load_lora_weights`` must give the trained model's output, not ~0.5-0.7 of its effect
    (the export now carries the adapter config as metadata, as the diffusers training scripts save it)."""
    res = run(diffusion_cfg(kind, tmp_path, "model.lora.r=4", "model.lora.alpha=8", "train.max_steps=2",
                            "train.lr=0.05"))
    fam, trained = res.recipe.family, res.recipe.unet
    pipe = tiny_components(kind, seed=0, sample_size=16).pipeline()  # a fresh base, as a user loads it
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.7]) if fam.flow else torch.tensor([100, 700])
    with torch.no_grad():
        cond = fam.finish_cond(fam.encode_prompts(pipe, ["a red circle", "a blue square"], "cpu"),
                               torch.full((2, 2), 32.0), torch.zeros(2, 2), 32)
        base = fam.predict(pipe.unet if not fam.flow else pipe.transformer, x, t, cond)
        pipe.load_lora_weights(str(tmp_path / "final"))
        loaded = fam.predict(pipe.unet if not fam.flow else pipe.transformer, x, t, cond)
        ours = fam.predict(trained, x, t, cond)
    assert (ours - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(loaded, ours, rtol=1e-4, atol=1e-5)
