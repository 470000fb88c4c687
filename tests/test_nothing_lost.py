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

    from mmalign.eval.sampling import LORA_FILE, made_by

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
    assert NOT_CACHED <= fields, NOT_CACHED - fields  # a renamed field cannot leave a stale name behind


def test_the_reference_table_key_is_built_from_the_fields_own_marks(tmp_path):
    """The precomputed reference table's key (and the reference record's) leaves out exactly the settings declared
    ``not_in("reference")`` with their fields (LoRA, the reference kind, checkpointing, compile, EMA, offload; how
    the cache fills): changing one of them reuses the table, changing what moves the reference's scores (the VAE,
    the dtype the frozen weights are stored in, the resolution, the data file rewritten in place) does not."""
    import os
    import shutil

    from mmalign.diffusion.cache import reference_table_path
    from mmalign.train.sections import load_config

    data = tmp_path / "pairs.parquet"
    shutil.copy("assets/data/shapes_pairs/train.parquet", data)

    def path(*ov):  # a path is only named, nothing is written (the cache folder is part of the key)
        return reference_table_path(load_config("configs/tiny/diffusion_dpo.yaml", [
            "data.cache_dir=/tmp/kc", "data.noise_draws=2", f"data.train={data}", *ov]), "train", 2).name

    base = path()
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the same name, rewritten: other pairs, maybe
    assert path() != base
    base = path()
    for same in ("model.lora={r: 4, alpha: 4}", "model.reference=copy", "model.gradient_checkpointing=true",
                 "model.gradient_checkpointing=auto",
                 "model.compile=true", "model.ema=true", "model.ema_decay=0.5", "model.reference_offload=true",
                 "data.cache_build=while_training", "loss.beta=10", "train.lr=0.5"):
        assert path(same) == base, same
    for other in ("model.vae=some/vae", "model.frozen_dtype=bfloat16", "data.resolution=64", "train.seed=7"):
        assert path(other) != base, other


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


# ---------------------------------------------------------------------------------------------- 4-13: the loop


def toy_cfg(out, **kw):
    from mmalign.train.sections import TrainSection

    base = dict(output_dir=str(out), max_steps=4, batch_size=8, lr=0.1, optimizer="sgd", log_every=1,
                report_to=["jsonl"], progress=False, max_grad_norm=None)
    base.update(kw)
    return TrainSection(**base)


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_non_finite_weights_are_caught_and_never_saved_or_exported(tmp_path, monkeypatch, policy):
    """An optimizer step that makes the weights non-finite (loss and gradients finite) stops the run under both
    nan policies, names the cause, keeps the last good checkpoint as it was and exports nothing."""
    from accelerate import Accelerator

    from mmalign.train import checkpoint as ckpt
    from mmalign.train.loop import NonFiniteLossError, train
    from mmalign.train.recipe import export_final
    from tests.toy_recipe import ToyRecipe

    real, calls = torch.optim.SGD.step, []

    def step(self, *a, **k):  # the optimizer turns the weights into inf on its third step (think lr=inf)
        out = real(self, *a, **k)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    r = ToyRecipe()
    with pytest.raises(NonFiniteLossError, match="step 3: the optimizer step made the weights non-finite"):
        train(r, toy_cfg(tmp_path, save_every=1, nan_policy=policy), Accelerator())
    saved = ckpt.load_checkpoint(ckpt.resolve_checkpoint(tmp_path, "latest"))
    assert saved["state"]["step"] == 2 and all(torch.isfinite(v).all() for v in saved["model"].values())
    with pytest.raises(FloatingPointError, match="refusing to export non-finite weights"):
        export_final(r, type("R", (), {"output_dir": str(tmp_path), "step": 3, "eval_history": [],
                                       "skipped_steps": 0})(), Accelerator())
    assert not (tmp_path / "final").exists()


@pytest.mark.parametrize("override,message", [("train.lr=.inf", "train.lr must be a finite number"),
                                              ("train.lr=.nan", "train.lr must be a finite number"),
                                              ("loss.beta=-0.1", "loss.beta must be > 0"),
                                              ("loss.beta=.inf", "loss.beta: must be a finite number")])
def test_non_finite_lr_or_beta_and_negative_beta_are_config_errors(override, message):
    from mmalign.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config("configs/tiny/lm_dpo.yaml", [override])


def test_resume_from_a_checkpoint_of_other_shapes_is_an_error_naming_key_and_shapes(tmp_path):
    """[1, 6] weights would broadcast into every row of [8, 6] with ``copy_``: refused instead."""
    from accelerate import Accelerator

    from mmalign.config import ConfigError
    from mmalign.train.loop import train
    from tests.toy_recipe import ToyRecipe

    class Narrow(ToyRecipe):
        def __init__(self, hidden):
            super().__init__()
            self.policy = self.model = torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.Tanh(),
                                                           torch.nn.Linear(hidden, 1))
            self.ref_model = Narrow.copy(self.model)

        @staticmethod
        def copy(m):
            import copy

            return copy.deepcopy(m)

    train(Narrow(1), toy_cfg(tmp_path, max_steps=2, save_every=2), Accelerator())
    with pytest.raises(ConfigError, match=r"shapes differ: \['0.bias: checkpoint \(1,\), model \(8,\)'"):
        train(Narrow(8), toy_cfg(tmp_path, max_steps=4, resume="latest"), Accelerator())


def test_a_dataset_without_readable_images_fails_instead_of_training_nothing(tmp_path):
    from mmalign.data.records import DataError
    from mmalign.diffusion.data import write_pickapic_parquet
    from mmalign.toyworld.world import synthetic_pairs

    rows = synthetic_pairs(8, seed=2)
    for r in rows:
        r["jpg_0"] = b"broken"
    write_pickapic_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError, match=r"8 of the 8 rows read so far were unreadable"):
        run(diffusion_cfg("sd", tmp_path / "run", f"data.train={tmp_path / 'bad.parquet'}", "data.eval=null",
                          "train.max_steps=20", "train.batch_size=4"))
    assert not (tmp_path / "run" / "final").exists()


def test_a_fresh_run_refuses_an_output_dir_with_old_checkpoints(tmp_path):
    """Pruning by step name used to delete the new run's checkpoints and leave ``latest`` dangling."""
    from accelerate import Accelerator

    from mmalign.config import ConfigError
    from mmalign.train import checkpoint as ckpt
    from mmalign.train.loop import train
    from tests.toy_recipe import ToyRecipe

    train(ToyRecipe(), toy_cfg(tmp_path, max_steps=40, save_every=20), Accelerator())
    with pytest.raises(ConfigError, match="holds checkpoints or online rounds of an earlier run .* train.resume=latest"):
        train(ToyRecipe(), toy_cfg(tmp_path, max_steps=4, save_every=2), Accelerator())
    res = train(ToyRecipe(), toy_cfg(tmp_path, max_steps=44, save_every=2, resume="auto"), Accelerator())
    assert res.step == 44 and ckpt.resolve_checkpoint(tmp_path, "latest").name == "step-00000044"
    # and pruning never removes the checkpoint ``latest`` names, whatever older names are there
    root = ckpt.checkpoint_dir(tmp_path)
    (root / "step-00099999").mkdir()
    ckpt._prune(root, 1, "step-00000044")
    assert (root / "step-00000044").is_dir()


def test_two_runs_in_one_output_dir_the_second_is_refused_naming_the_first(tmp_path):
    import subprocess
    import sys
    import time

    hold = ("import sys, time; from mmalign.train.checkpoint import output_lock\n"
            "with output_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        r = subprocess.run([sys.executable, "-m", "mmalign", "train", "configs/tiny/lm_dpo.yaml",
                            f"train.output_dir={tmp_path}", "train.max_steps=1"], capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 1 and f"is in use by pid {p.pid}" in r.stderr and "Traceback" not in r.stderr
    finally:
        p.kill()
        p.wait()
    time.sleep(0.1)
    from accelerate import Accelerator

    from mmalign.train.loop import train
    from tests.toy_recipe import ToyRecipe

    assert train(ToyRecipe(), toy_cfg(tmp_path, max_steps=1), Accelerator()).step == 1  # released with its owner


def test_metrics_log_has_each_step_once_after_resume_and_is_strict_json(tmp_path):
    import json

    from accelerate import Accelerator

    from mmalign.train import checkpoint as ckpt
    from mmalign.train.loop import train
    from tests.toy_recipe import ToyRecipe

    train(ToyRecipe(nan_rows=set(range(64))), toy_cfg(tmp_path, max_steps=3, save_every=2, nan_policy="skip"), Accelerator())
    root = ckpt.checkpoint_dir(tmp_path)  # as if killed after step 3 was logged but before it was saved
    import shutil

    shutil.rmtree(root / "step-00000003")
    (root / "latest").write_text("step-00000002")
    train(ToyRecipe(nan_rows=set(range(64))), toy_cfg(tmp_path, max_steps=4, save_every=2, nan_policy="skip",
                                           resume="latest"), Accelerator())

    def strict(c):
        raise ValueError(f"not JSON: {c}")

    recs = [json.loads(x, parse_constant=strict) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert any(r["train/loss"] is None for r in recs)  # the skipped step's NaN loss is written as null


# ---------------------------------------------------------------------------------------------- 6. 16-bit images


def test_16_bit_png_is_scaled_to_8_bits_not_white(tmp_path):
    import numpy as np
    from PIL import Image

    from mmalign.data.images import open_image

    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)  # 0 .. 63000 of 65535
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")  # Pillow reads it as a 16-bit mode
    got = np.asarray(open_image("g16.png", root=tmp_path))
    assert got.shape == (8, 8, 3) and (got[..., 0] == got[..., 1]).all()
    np.testing.assert_array_equal(got[..., 0], np.round(ramp / 257.0).astype(np.uint8))
    assert got.min() == 0 and got.max() == 245  # not pure white


# ---------------------------------------------------------------------------------------------- 8. table paths


@pytest.fixture
def outside(tmp_path):
    from PIL import Image

    p = tmp_path / "outside.png"
    Image.new("RGB", (40, 40), (200, 10, 10)).save(p)
    return p


def _table(tmp_path, jpg_1):
    """A parquet file in ``data/`` whose row 0 names ``jpg_1`` as a path (the others hold bytes)."""
    import datasets

    from mmalign.diffusion.data import write_pickapic_parquet
    from mmalign.toyworld.world import synthetic_pairs

    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    write_pickapic_parquet(d / "bytes.parquet", synthetic_pairs(4, seed=3))
    rows = datasets.Dataset.from_parquet(str(d / "bytes.parquet")).to_list()
    rows[0]["jpg_1"] = jpg_1
    (d / "bytes.parquet").unlink()
    if isinstance(jpg_1, dict):
        for r in rows[1:]:
            r["jpg_1"] = {"bytes": r["jpg_1"], "path": None}
        ds = datasets.Dataset.from_list(rows)
        ds = ds.cast_column("jpg_1", datasets.Image())  # an HF image column (struct with bytes / path)
        ds.to_parquet(str(d / "pairs.parquet"))
    else:  # a string column of paths: the other rows name files inside the folder
        for i, r in enumerate(rows[1:], 1):
            (d / f"r{i}.png").write_bytes(r["jpg_1"])
            r["jpg_1"] = f"r{i}.png"
        datasets.Dataset.from_list(rows).to_parquet(str(d / "pairs.parquet"))
    return d / "pairs.parquet"


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "hf_struct"])
def test_table_image_paths_stay_inside_the_data_folder(tmp_path, outside, kind, monkeypatch):
    from mmalign.data.records import DataError
    from mmalign.diffusion.data import PreferencePairs

    value = {"absolute": str(outside), "dotdot": "../outside.png",
             "hf_struct": {"bytes": None, "path": str(outside)}}[kind]
    table = _table(tmp_path, value)
    monkeypatch.chdir(tmp_path / "data")  # "../outside.png" from the cwd would be the file outside
    data = PreferencePairs(str(table), resolution=32)
    with pytest.raises(DataError, match="row 0: jpg_1: file name .* resolves outside the dataset folder"):
        data[0]


def test_a_relative_table_path_resolves_against_the_table_not_the_cwd(tmp_path, monkeypatch):
    from PIL import Image

    from mmalign.diffusion.data import PreferencePairs

    table = _table(tmp_path, "img/inside.png")
    (tmp_path / "data" / "img").mkdir()
    Image.new("RGB", (40, 40), (0, 200, 0)).save(tmp_path / "data" / "img" / "inside.png")
    (tmp_path / "img").mkdir()
    Image.new("RGB", (40, 40), (0, 0, 200)).save(tmp_path / "img" / "inside.png")  # a decoy beside the cwd
    monkeypatch.chdir(tmp_path)
    px = PreferencePairs(str(table), resolution=32, drop_ties=True)[0]["pixels"]
    winner_first = px if float(px[0, 1].mean()) > 0.5 else px.flip(0)  # green, from the table's folder
    assert float(winner_first[1, 1].mean()) > 0.5 or float(winner_first[0, 1].mean()) > 0.5


@pytest.mark.parametrize("command", ["label", "fifa"])
def test_label_and_fifa_refuse_table_paths_outside_the_data(tmp_path, outside, command, capsys):
    from mmalign.cli import main

    table = _table(tmp_path, str(outside))
    argv = (["label", "--reward", "toy_clip", "--data", str(table), "--out", str(tmp_path / "o.parquet")]
            if command == "label" else
            ["data", "fifa", "--reward", "toy_clip", "--data", str(table), "--out", str(tmp_path / "o.parquet")])
    assert main(argv) == 1
    assert "resolves outside the dataset folder" in capsys.readouterr().err
    assert main([*argv, "--allow-outside-root"]) == 0  # trusted data: explicitly


# ---------------------------------------------------------------------------------------------- 9. reports


def test_score_refuses_symlinks_out_of_the_image_folder(tmp_path, outside, capsys):
    from PIL import Image

    from mmalign.cli import main

    d = tmp_path / "imgs"
    d.mkdir()
    Image.new("RGB", (16, 16)).save(d / "a.png")
    (d / "b.png").symlink_to(outside)
    argv = ["score", "--reward", "toy_clip", "--images", str(d), "--prompt", "a red circle", "--out", str(tmp_path / "s.csv")]
    assert main(argv) == 1 and "resolves outside the dataset folder" in capsys.readouterr().err
    assert main([*argv, "--allow-outside-root"]) == 0


def test_eval_names_cannot_climb_out_of_out(tmp_path, capsys):
    from mmalign.cli import main

    assert main(["eval", "--base", "assets/models/shapes-sd", "--tuned", "../x=assets/models/shapes-sd",
                 "--prompts", "shapes", "--reward", "world", "--out", str(tmp_path / "e")]) == 1
    assert "must be a plain folder name" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_csv_cells_that_look_like_formulas_are_quoted(tmp_path):
    import csv

    from mmalign.data.records import write_rows

    write_rows(str(tmp_path / "s.csv"), [{"prompt": '=HYPERLINK("http://x","y")', "score": -0.5},
                                         {"prompt": "+1", "score": 0.25}, {"prompt": "@SUM(A1)", "score": 1.0},
                                         {"prompt": "a red circle", "score": 2.0}])
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert [r["prompt"] for r in rows] == ['\'=HYPERLINK("http://x","y")', "'+1", "'@SUM(A1)", "a red circle"]
    assert rows[0]["score"] == "-0.5"  # numbers stay numbers


# ---------------------------------------------------------------------------------------------- 15. smaller ones


def _loss_names():
    from mmalign.losses import LOSSES

    return sorted(LOSSES)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["+inf", "-inf"])
@pytest.mark.parametrize("name", _loss_names())
def test_an_infinite_input_score_makes_its_row_bad_in_every_loss(name, sign):
    """+-inf scores used to give a finite loss with zero gradient (and +-inf metrics) in 21 losses; now the row's
    loss is NaN, like a NaN score's, so the loop's nan_policy handles it."""
    from mmalign.losses import LOSSES, RunningMoments
    from tests.test_invariance import D, micro_loss, rows

    fn = LOSSES[name]
    rs = rows(0)
    for k in ("xc", "xr", "xl", "xt_c", "xt_r"):
        rs[3][k] = torch.full_like(rs[3][k], sign * float("inf"))
    loss = micro_loss(fn, torch.ones(D, dtype=torch.float64), rs, RunningMoments(), torch.tensor(0.0, dtype=torch.float64))
    assert torch.isnan(loss[3]), (name, loss)
    if not fn.batch_dependent:
        assert torch.isfinite(loss[[i for i in range(len(loss)) if i != 3]]).all(), (name, loss)


def test_relative_online_prompt_files_resolve_from_any_directory(tmp_path, monkeypatch):
    """``online.prompts`` / ``eval_prompts`` in a shipped config name files relative to the repository, as
    ``data.train`` does; they used to work only from the repository's root."""
    from mmalign.data.prompts import load_prompts

    monkeypatch.chdir(tmp_path)
    assert load_prompts("assets/prompts/toy_text_train.jsonl")[0]
    assert load_prompts("assets/prompts/shapes.txt")[0] == "a red circle"


def test_duplicate_yaml_keys_are_refused(tmp_path):
    from mmalign.config import ConfigError, read_config

    (tmp_path / "c.yaml").write_text("recipe: lm\ntrain:\n  lr: 1.0e-3\n  lr: 1.0\n")
    with pytest.raises(ConfigError, match="line 4: key 'lr' given twice"):
        read_config(tmp_path / "c.yaml")


def test_text_pairs_with_chosen_equal_rejected_are_dropped_and_counted(tmp_path, capsys):
    import json

    from mmalign.data.text import TextPreferenceData
    from mmalign.models.lm import load_tokenizer

    rows = [{"prompt": "q", "chosen": "yes", "rejected": "no"}, {"prompt": "q", "chosen": "same", "rejected": "same"},
            {"prompt": "r", "chosen": "a", "rejected": "b"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = TextPreferenceData(str(tmp_path / "t.jsonl"), "pairs", load_tokenizer(None))
    assert len(data) == 2 and data.identical == 1
    assert "dropped 1 pair(s) whose chosen equals rejected (e.g. row 1)" in capsys.readouterr().out


def test_an_export_that_dies_half_way_leaves_the_previous_final_intact(tmp_path, monkeypatch):
    """``final/`` is written as ``final.tmp`` and swapped in whole: a kill or a full disk part-way through the
    export never leaves a partial ``final``; the next export replaces it."""
    from accelerate import Accelerator

    from mmalign.train.loop import train
    from mmalign.train.recipe import export_final
    from tests.toy_recipe import ToyRecipe

    class Exporting(ToyRecipe):
        fail = False

        def export(self, out_dir, card=None):
            from pathlib import Path

            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "a.txt").write_text(str(self.fail))
            if self.fail:
                raise OSError(28, "No space left on device", str(out_dir))
            (Path(out_dir) / "b.txt").write_text("complete")

    r = Exporting()
    res = train(r, toy_cfg(tmp_path, max_steps=1), Accelerator())
    export_final(r, res, Accelerator())
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["a.txt", "b.txt"]
    r.fail = True
    with pytest.raises(OSError):
        export_final(r, res, Accelerator())
    assert (tmp_path / "final" / "a.txt").read_text() == "False" and (tmp_path / "final" / "b.txt").exists()
    r.fail = False
    export_final(r, res, Accelerator())
    assert (tmp_path / "final" / "b.txt").exists() and not (tmp_path / "final.tmp").exists()
