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


# ---------------------------------------------------------------------------------------------- 2. stale samples


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    from mmalign.diffusion.models import save_components

    root = tmp_path_factory.mktemp("models")
    for seed in (0, 1):
        save_components(tiny_components("sd", seed=seed), root / f"m{seed}")
    (root / "p.txt").write_text("a red circle\na blue square\n")
    return root


def _pixels(folder):
    import json

    import numpy as np
    from PIL import Image

    rows = [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines()]
    return {r["file_name"]: np.asarray(Image.open(folder / r["file_name"])) for r in rows}


def test_sample_into_a_used_folder_never_keeps_images_of_other_weights_or_settings(tmp_path, two_models, capsys):
    import numpy as np

    from mmalign.cli import main

    def sample(model, *extra, out=tmp_path / "s"):
        assert main(["sample", "--model", str(two_models / model), "--prompts", str(two_models / "p.txt"),
                     "--seeds", "0", "1", "--steps", "2", "--resolution", "32", "--out", str(out), *extra]) == 0
        return _pixels(out)

    a = sample("m0")
    b = sample("m1")  # another model, same folder: every image is sampled again
    assert "4 image(s) there were made by other weights" in capsys.readouterr().out
    fresh_b = sample("m1", out=tmp_path / "fresh")
    for k in a:
        assert np.array_equal(b[k], fresh_b[k]) and not np.array_equal(b[k], a[k]), k
    mtimes = {k: (tmp_path / "s" / k).stat().st_mtime_ns for k in b}
    sample("m1")  # the same request: nothing is re-sampled
    assert all((tmp_path / "s" / k).stat().st_mtime_ns == t for k, t in mtimes.items())
    sample("m1", "--guidance", "2")  # other settings: sampled again
    assert "4 image(s)" in capsys.readouterr().out


def test_a_lora_retrained_in_place_is_not_mistaken_for_the_old_one(tmp_path, two_models):
    from safetensors.torch import load_file, save_file

    from mmalign.diffusion.sampling import LORA_FILE, made_by

    run(diffusion_cfg("sd", tmp_path / "t", "train.max_steps=1", "model.tiny={seed: 0, sample_size: 16}"))
    lora = tmp_path / "t" / "final"
    before = made_by(str(two_models / "m0"), str(lora), "sd")
    sd = load_file(str(lora / LORA_FILE))
    save_file({k: v * 2 for k, v in sd.items()}, str(lora / LORA_FILE))  # same path, new weights
    after = made_by(str(two_models / "m0"), str(lora), "sd")
    assert before["lora"] == after["lora"] and before["lora_sha256"] != after["lora_sha256"]


# ---------------------------------------------------------------------------------------------- 3. cache key


def test_latent_cache_is_keyed_by_the_model_vae_and_preprocessing(tmp_path):
    """Another model, another VAE (model.vae), another crop or another data file never reads this cache."""
    import dataclasses

    from accelerate import Accelerator

    from mmalign.diffusion.cache import NOT_CACHED, cache_key
    from mmalign.diffusion.models import save_components
    from mmalign.train.diffusion import DiffusionRecipe
    from mmalign.train.sections import DiffusionDataSection

    for seed in (0, 1):
        save_components(tiny_components("sd", seed=seed), tmp_path / f"m{seed}")
    cache = f"data.cache_dir={tmp_path / 'cache'}"

    def latents(*ov):
        cfg = diffusion_cfg("sd", tmp_path / "run", "model.tiny=null", "data.max_examples=4", "data.eval=null",
                            cache, *ov)
        r = DiffusionRecipe(cfg, Accelerator())
        return r.train_data[0]["latents"]

    a = latents(f"model.name_or_path={tmp_path / 'm0'}")
    b = latents(f"model.name_or_path={tmp_path / 'm1'}")  # other VAE weights: other latents
    assert not torch.allclose(a, b)
    c = latents(f"model.name_or_path={tmp_path / 'm0'}", f"model.vae={tmp_path / 'm1'}")  # the VAE override
    torch.testing.assert_close(c, b)
    d = latents(f"model.name_or_path={tmp_path / 'm0'}", "data.center_crop=false")
    assert d.shape == a.shape
    assert len(list((tmp_path / "cache").glob("train-*"))) == 4
    torch.testing.assert_close(latents(f"model.name_or_path={tmp_path / 'm0'}", "loss.beta=10"), a)  # shared
    assert len(list((tmp_path / "cache").glob("train-*"))) == 4
    # every data setting is either in the key or named as not changing the cache
    fields = {f.name for f in dataclasses.fields(DiffusionDataSection)}
    cfg = diffusion_cfg("sd", tmp_path / "run", cache)
    keyed = set(cache_key(cfg, "train", torch.float32)["data"])
    assert fields <= keyed | NOT_CACHED, fields - keyed - NOT_CACHED


# ---------------------------------------------------------------------------------------------- 11. atomic writes


def test_a_full_disk_while_caching_never_bricks_the_cache(tmp_path, monkeypatch, capsys):
    """A write that fills the disk half-way leaves no truncated cache file behind; a cache whose meta.json an
    older version left truncated is rebuilt with a message, not a crash."""
    import errno

    from accelerate import Accelerator

    from mmalign.diffusion import cache as cache_mod
    from mmalign.train.diffusion import DiffusionRecipe

    cfg = lambda: diffusion_cfg("sd", tmp_path / "run", "data.max_examples=4", "data.eval=null",  # noqa: E731
                                f"data.cache_dir={tmp_path / 'cache'}")
    real = cache_mod.save_file

    def full_disk(tensors, path, *a, **k):
        if "empty" in str(path):
            with open(path, "wb") as f:
                f.write(b"\0" * 7)  # half a file, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(cache_mod, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        DiffusionRecipe(cfg(), Accelerator())
    monkeypatch.setattr(cache_mod, "save_file", real)
    want = DiffusionRecipe(cfg(), Accelerator()).train_data[0]["latents"]  # resumes the build, reads fine
    (path,) = (tmp_path / "cache").glob("train-*")
    (path / "meta.json").write_text('{"rows": 4, "sha')  # truncated by a full disk (as before this fix)
    got = DiffusionRecipe(cfg(), Accelerator()).train_data[0]["latents"]
    assert "unreadable meta.json; rebuilding it" in capsys.readouterr().out
    torch.testing.assert_close(got, want)
