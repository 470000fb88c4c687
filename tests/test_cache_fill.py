"""A latent + text cache filled by the training steps (data.cache_build, mmalign.diffusion.fill): the same numbers as
the up-front cache for the same draws, only the drawn orientation encoded, complete fills compacted into the shard
cache, unreadable rows recorded, and the auto rule."""
import json

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from mmalign.diffusion.cache import CachedPairs
from mmalign.diffusion.data import write_pickapic_parquet
from mmalign.diffusion.fill import CacheFill
from mmalign.toyworld.world import synthetic_pairs
from mmalign.train.diffusion import DiffusionRecipe, run
from mmalign.train.sections import load_config

CONFIGS = {"sd": "configs/tiny/diffusion_dpo.yaml", "sdxl": "configs/tiny/diffusion_dpo.yaml",
           "sd3": "configs/tiny/flow_dpo.yaml", "flux": "configs/tiny/flux_dpo.yaml"}


def cfg_(kind, out, *ov):
    extra = ["model.kind=sdxl"] if kind == "sdxl" else []
    return load_config(CONFIGS[kind], [f"train.output_dir={out}", "train.progress=false", "validation.prompts=[]",
                                       "data.eval=null", "data.max_examples=8", *extra, *ov])


def recipe_(kind, out, *ov):
    torch.manual_seed(0)
    return DiffusionRecipe(cfg_(kind, out, *ov), Accelerator())


def batch(r, rows):
    return r.train_data.collate([r.train_data[i] for i in rows])


def steps(r, n=4, rows=(0, 1, 2, 3, 4, 5)):
    """Per-step (loss, model_mse_w, ref_mse_w) over n steps on the same rows (flipped and unflipped draws)."""
    out = []
    for s in range(n):
        o = r.compute(batch(r, rows), step=s)
        out.append(torch.stack([o.loss.detach().mean(), o.metrics["model_mse_w"].mean(), o.metrics["ref_mse_w"].mean()]))
    return torch.stack(out)


@pytest.mark.parametrize("kind,extra", [("sd", []), ("sdxl", []), ("flux", []),
                                        ("sd", ["data.caption_dropout=0.5"])])
def test_filling_while_training_gives_the_numbers_of_the_up_front_cache(tmp_path, kind, extra):
    """Same draws, same losses and scores (fp32: the VAE's batch-size rounding only), whether the latents come from a
    cache built before training or are encoded by the step and kept; a second pass reads what the first kept."""
    up = recipe_(kind, tmp_path / "a", f"data.cache_dir={tmp_path / 'c1'}", "data.cache_build=before_training", *extra)
    fill = recipe_(kind, tmp_path / "b", f"data.cache_dir={tmp_path / 'c2'}", "data.cache_build=while_training",
                   *extra)
    assert fill.inputs.fills and not up.inputs.fills
    torch.testing.assert_close(steps(fill), steps(up), rtol=1e-4, atol=1e-6)
    again = steps(fill)  # every draw of these steps is in the fill now: no encode, same numbers
    torch.testing.assert_close(again, steps(up), rtol=1e-4, atol=1e-6)


def test_a_single_pass_encodes_only_what_the_steps_draw(tmp_path, monkeypatch):
    """A pass over uncached data runs the VAE on each pair's drawn orientation (as the diffusers script does) and
    the text encoder once per caption; the up-front build encodes both orientations of every pair."""
    counts = {"up": 0, "fill": 0}
    for name, mode in (("up", "before_training"), ("fill", "while_training")):
        r = recipe_("sd", tmp_path / name, f"data.cache_dir={tmp_path / name / 'c'}", f"data.cache_build={mode}")
        if name == "up":
            counts[name] = 2 * 2 * len(r.train_data)  # built in __init__: 2 images x 2 orientations per pair
            continue
        real = r.inputs.encode_pixels
        monkeypatch.setattr(r.inputs, "encode_pixels", lambda p: counts.__setitem__("fill", counts["fill"]
                                                                                      + p.shape[0] * 2) or real(p))
        for s, rows in enumerate(((0, 1, 2, 3), (4, 5, 6, 7))):  # one pass over the 8 pairs
            r.compute(batch(r, rows), step=s)
    assert counts == {"up": 32, "fill": 16}


def test_auto_fills_while_training_only_when_each_pair_is_read_at_most_once(tmp_path):
    one_pass = recipe_("sd", tmp_path / "a", f"data.cache_dir={tmp_path / 'c'}", "train.max_steps=2",
                       "train.batch_size=4")  # 8 reads of 8 pairs
    assert "train" in one_pass.inputs.fills and not isinstance(one_pass.train_data, CachedPairs)
    two = recipe_("sd", tmp_path / "b", f"data.cache_dir={tmp_path / 'd'}", "train.max_steps=3", "train.batch_size=4")
    assert not two.inputs.fills and isinstance(two.train_data, CachedPairs)  # 12 reads: the up-front cache
    pre = recipe_("sd", tmp_path / "c", f"data.cache_dir={tmp_path / 'e'}", "train.max_steps=1",
                  "model.reference=precomputed", "data.noise_draws=1")
    assert not pre.inputs.fills  # the reference table reads every pair first


def test_a_complete_fill_becomes_the_shard_cache_of_the_up_front_build(tmp_path):
    """Runs that together read every pair in both orientations leave a fill the next run compacts into the shard
    cache -- the tensors build_cache would write -- and the run reads it as an up-front cache."""
    cache = tmp_path / "c"
    base = [f"data.cache_dir={cache}", "train.batch_size=4", "train.report_to=[jsonl]"]
    full = lambda p: all({"latents", "latents_flip"} <= v for v in CacheFill(p, torch.float32).rows().values())  # noqa: E731
    for k in range(8):  # single passes (auto fills) with other seeds draw other flips, until all 16 are in
        run(cfg_("sd", tmp_path / f"run{k}", *base, "train.max_steps=2", f"train.seed={k}"))
        (path,) = cache.glob("train-*")
        if len(CacheFill(path, torch.float32).rows()) == 8 and full(path):
            break
    assert k >= 1 and (path / "fill").is_dir() and not (path / "meta.json").exists()  # filled, not compacted yet
    r = recipe_("sd", tmp_path / "next", *base, "train.max_steps=2", "train.seed=0")  # compacts first
    assert not (path / "fill").exists() and isinstance(r.train_data, CachedPairs) and not r.inputs.fills
    ref = recipe_("sd", tmp_path / "up", f"data.cache_dir={tmp_path / 'u'}", "data.cache_build=before_training")
    del ref
    (upath,) = (tmp_path / "u").glob("train-*")
    got, want = load_file(str(path / "shard-00000.safetensors")), load_file(str(upath / "shard-00000.safetensors"))
    assert sorted(got) == sorted(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")


def test_unreadable_rows_are_recorded_and_listed_when_the_fill_is_compacted(tmp_path):
    rows = synthetic_pairs(6, seed=0, image_size=32)
    rows[2]["jpg_1"] = b"not an image"
    write_pickapic_parquet(tmp_path / "pairs.parquet", rows)
    base = [f"data.train={tmp_path / 'pairs.parquet'}", f"data.cache_dir={tmp_path / 'c'}", "data.random_flip=false",
            "data.cache_build=while_training", "train.max_unreadable_fraction=0.5"]
    r = recipe_("sd", tmp_path / "a", *base)
    r.compute(batch(r, range(6)), step=0)
    r.flush_fills()
    fill = CacheFill(next((tmp_path / "c").glob("train-*")), torch.float32)
    assert "bad" in fill.rows()[2] and "latents" in fill.rows()[0]
    recipe_("sd", tmp_path / "b", *base)  # complete (no flips): compacted
    (path,) = (tmp_path / "c").glob("train-*")
    assert json.loads((path / "report.json").read_text())["corrupt_rows"] == [2]
    assert load_file(str(path / "shard-00000.safetensors"))["ok"].tolist() == [1, 1, 0, 1, 1, 1]


def test_parts_are_written_whole_and_a_run_keeps_what_it_encoded(tmp_path):
    """A run's steps are written at its end (and at each checkpoint); a part file is renamed into place whole."""
    cache = tmp_path / "c"
    res = run(cfg_("sd", tmp_path / "a", f"data.cache_dir={cache}", "train.max_steps=2", "train.batch_size=4",
                   "train.report_to=[jsonl]"))
    assert res.history
    (path,) = cache.glob("train-*")
    parts = list((path / "fill").glob("part-0-*.safetensors"))
    assert parts and not list((path / "fill").glob(".*tmp"))
    have = CacheFill(path, torch.float32).rows()
    assert sorted(have) == list(range(8)) and all({"latents", "embeds_w", "size"} <= k or {"latents_flip"} <= k
                                                  for k in have.values())


def test_a_training_run_has_the_same_losses_filling_the_cache_or_reading_it(tmp_path):
    """The loop end to end: a single pass filling the cache, the same run on an up-front cache, and a rerun on the
    fill the first left -- one loss trajectory (fp32: the VAE's batch-size rounding only)."""
    base = ["train.max_steps=2", "train.batch_size=4", "train.report_to=[jsonl]", "train.log_every=1"]
    losses = lambda res: torch.tensor([h["train/loss"] for h in res.history])  # noqa: E731
    fill = run(cfg_("sd", tmp_path / "a", *base, f"data.cache_dir={tmp_path / 'c'}"))  # auto: fills
    again = run(cfg_("sd", tmp_path / "b", *base, f"data.cache_dir={tmp_path / 'c'}"))  # reads the fill back
    up = run(cfg_("sd", tmp_path / "u", *base, f"data.cache_dir={tmp_path / 'd'}", "data.cache_build=before_training"))
    assert len(losses(up)) == 2
    torch.testing.assert_close(losses(fill), losses(up), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses(again), losses(up), rtol=1e-4, atol=1e-6)


def test_an_up_front_build_supersedes_a_partial_fill(tmp_path):
    """A single pass leaves a partial fill; a later run that reads the data twice builds the shard cache up front
    and removes the parts it no longer needs."""
    cache = tmp_path / "c"
    base = [f"data.cache_dir={cache}", "train.batch_size=4", "train.report_to=[jsonl]"]
    run(cfg_("sd", tmp_path / "a", *base, "train.max_steps=1"))  # 4 reads of 8 pairs: fills
    (path,) = cache.glob("train-*")
    assert (path / "fill").is_dir()
    r = recipe_("sd", tmp_path / "b", *base, "train.max_steps=4")  # 16 reads: up front
    assert isinstance(r.train_data, CachedPairs) and not (path / "fill").exists()


def test_a_fill_of_many_parts_keeps_few_files_open(tmp_path):
    fill = CacheFill(tmp_path, torch.float32, flush_every=1)  # one part per tensor
    for r in range(40):
        fill.put(r, "latents", torch.full((2,), float(r)))
    again = CacheFill(tmp_path, torch.float32)
    assert len(list((tmp_path / "fill").glob("part-*.safetensors"))) == 40
    assert [float(again.get(r, "latents")[0]) for r in range(40)] == [float(r) for r in range(40)]
    assert len(again._open) <= 16
