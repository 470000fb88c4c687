"""One ``Reference`` for every recipe: the frozen copy, the LoRA base with adapters disabled and precomputed
scores give the same loss once the policy has moved away from the reference (text, VLM, and the
diffusion engine's UNet and flow families)."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
from accelerate import Accelerator

from mmalign.train.sections import load_config
from mmalign.train.reference import Reference, adapters_disabled, resolve_kind

CASES = {
    "lm": ("configs/tiny/lm_dpo.yaml", ["data.max_eval_examples=16"], "eval"),
    "vlm": ("configs/tiny/vlm_dpo.yaml", ["data.max_eval_examples=8"], "eval"),
    "diffusion-sd": ("configs/tiny/diffusion_dpo.yaml", ["data.noise_draws=2", "data.max_examples=8", "data.eval=null",
                                                         "validation.prompts=[]"], "train"),
    "diffusion-sd3": ("configs/tiny/flow_dpo.yaml", ["data.noise_draws=2", "data.max_examples=8", "data.eval=null",
                                                     "validation.prompts=[]"], "train"),
    "diffusion-flux": ("configs/tiny/flux_dpo.yaml", ["data.noise_draws=2", "data.max_examples=8", "data.eval=null",
                                                      "validation.prompts=[]"], "train"),
}


def recipe_for(name: str, tmp, kind: str, lora: bool):
    path, extra, _ = CASES[name]
    ov = [f"train.output_dir={tmp}", "train.progress=false", f"model.reference={kind}", *extra,
          "model.lora={r: 4, alpha: 8}" if lora else "model.lora=null"]
    cfg = load_config(path, ov)
    module = importlib.import_module(type(cfg).runner.split(":")[0])
    cls = {"lm": "LMRecipe", "vlm": "VLMRecipe", "diffusion": "DiffusionRecipe"}[cfg.recipe]
    torch.manual_seed(0)
    return getattr(module, cls)(cfg, Accelerator())


def moved_loss(recipe, split: str, lora: bool):
    policy = getattr(recipe, "unet", None) or recipe.policy
    with torch.no_grad():  # move the policy away from the reference, identically in every run
        g = torch.Generator().manual_seed(1)
        for n, p in policy.named_parameters():
            if p.requires_grad and (not lora or "lora_B" in n):
                p.add_(torch.randn(p.shape, generator=g) * (0.3 if lora else 0.01))
    data = recipe.eval_data if split == "eval" else recipe.train_data
    batch = data.collate([data[i] for i in range(8)]).to(recipe.acc.device)
    return recipe.compute(batch, step=1, split=split).loss


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_three_references_give_the_same_loss(tmp_path, name, lora):
    split = CASES[name][2]
    kinds = ["copy", "precomputed"] + (["peft"] if lora else [])
    losses = {k: moved_loss(recipe_for(name, tmp_path / k, k, lora), split, lora) for k in kinds}
    ref = losses["copy"]
    assert not torch.allclose(ref, torch.full_like(ref, math.log(2)), atol=1e-4)  # the policy really moved
    for k, v in losses.items():
        torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {k}: {m}")


def test_reference_kinds_and_errors():
    lin = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
    ref = Reference("copy", lin, mode="policy")
    assert ref.model is not lin and ref.model[1].p == 0.0 and not any(p.requires_grad for p in ref.model.parameters())
    with ref.context() as m:
        assert m is ref.model and not torch.is_grad_enabled()
    with pytest.raises(RuntimeError, match="reference-free"):
        with Reference("none", lin).context():
            pass
    with pytest.raises(ValueError, match="unknown reference kind"):
        Reference("frozen", lin)
    assert resolve_kind("auto", lora=True) == "peft" and resolve_kind("auto", lora=False) == "copy"
    assert resolve_kind("copy", lora=False, needs_reference=False) == "none"
    with pytest.raises(ValueError, match="needs model.lora"):
        resolve_kind("peft", lora=False)
    with adapters_disabled(lin):  # a model without adapters passes through
        pass
    with pytest.raises(RuntimeError, match="no 'eval' table"):
        Reference("precomputed", lin).lookup("eval", torch.tensor([0]))
