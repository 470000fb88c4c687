"""Diffusion-DPO: scoring conventions, the three references, data handling, cache, exports, resume."""
import io
import json
import math

import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from mmalign.config import ConfigError
from mmalign.train.sections import load_config
from mmalign.data.records import DataError
from mmalign.toyworld.world import synthetic_pairs
from mmalign.diffusion.data import PreferencePairs, write_pickapic_parquet
from mmalign.diffusion.models import load_components, tiny_components
from mmalign.diffusion.families import Cond, UNetFamily, sdxl_time_ids
from mmalign.train.diffusion import DiffusionRecipe, run
from mmalign.train.loop import train

TINY = "configs/tiny/diffusion_dpo.yaml"
PAIRS = "assets/data/shapes_pairs/train.parquet"


def cfg_(tmp_path, *ov):
    return load_config(TINY, [f"train.output_dir={tmp_path}", "train.progress=false", "validation.prompts=[]", *ov])


def recipe_(tmp_path, *ov):
    torch.manual_seed(0)
    return DiffusionRecipe(cfg_(tmp_path, *ov), Accelerator())


def batch_of(recipe, n=4, data=None):
    data = data or recipe.train_data
    b = data.collate([data[i] for i in range(n)])
    return b.to(recipe.acc.device)


@pytest.mark.parametrize("kind,lora", [("sd", True), ("sd", False), ("sdxl", True), ("sdxl", False)])
def test_step0_loss_is_ln2_and_accuracy_half(tmp_path, kind, lora):
    ov = [f"model.kind={kind}", "train.max_steps=1"] + ([] if lora else ["model.lora=null"])
    r = recipe_(tmp_path, *ov)
    out = r.compute(batch_of(r, 4), step=0)
    torch.testing.assert_close(out.loss, torch.full_like(out.loss, math.log(2)), rtol=0, atol=1e-4)
    assert torch.all(out.metrics["reward_accuracy"] == 0.5)


def test_loss_is_salesforce_formula_on_mse(tmp_path):
    """loss = -logsigmoid(-0.5 beta ((mse_w - mse_l) - (ref_w - ref_l))), implicit acc from its sign."""
    r = recipe_(tmp_path)
    with torch.no_grad():  # move the policy away from the reference
        for n, p in r.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    out = r.compute(batch_of(r, 6), step=3)
    m = out.metrics
    inside = -0.5 * 5000 * ((m["model_mse_w"] - m["model_mse_l"]) - (m["ref_mse_w"] - m["ref_mse_l"]))
    torch.testing.assert_close(out.loss, -torch.nn.functional.logsigmoid(inside), rtol=1e-5, atol=1e-6)
    acc = (inside > 0).float() + 0.5 * (inside == 0).float()
    torch.testing.assert_close(m["reward_accuracy"], acc)
    assert not torch.all(out.loss == out.loss[0])


def test_winner_and_loser_share_noise_and_t():
    comp = tiny_components("sd")
    x = torch.randn(3, 1, 4, 8, 8).repeat(1, 2, 1, 1, 1)  # identical winner and loser
    cond = Cond(torch.randn(6, 16, 32))
    cond.embeds[3:] = cond.embeds[:3]
    mse = UNetFamily(comp).pair_mse(comp.unet, x, torch.randn(3, 4, 8, 8), torch.tensor([5, 500, 900]), cond)
    w, l_ = mse.chunk(2)
    torch.testing.assert_close(w, l_, rtol=0, atol=1e-6)  # same t and noise: same error (up to batch-row rounding)
    assert (w - mse.roll(1)[:3]).abs().max() > 1e-3  # whereas different rows (other t/noise) differ


def test_v_prediction_target():
    comp = tiny_components("sd", prediction_type="v_prediction")
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    _, target = UNetFamily(comp).noisy_and_target(x0, noise, t)
    a = comp.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(target, a.sqrt() * noise - (1 - a).sqrt() * x0)
    comp_e = tiny_components("sd")
    _, te = UNetFamily(comp_e).noisy_and_target(x0, noise, t)
    assert torch.equal(te, noise)


def test_sdxl_time_ids():
    ids = sdxl_time_ids(torch.tensor([[600.0, 800.0]]), torch.tensor([[10.0, 20.0]]), 1024)
    assert ids.tolist() == [[600.0, 800.0, 10.0, 20.0, 1024.0, 1024.0]]


def test_caption_dropout_is_shared_by_the_pair_and_uses_empty_prompt(tmp_path):
    r = recipe_(tmp_path, "data.caption_dropout=0.5")
    b = batch_of(r, 8)
    gens = [r.inputs.generator(0, int(i), "train") for i in b.index]
    x0, noise, t, cond = r.inputs.build(b, gens, "train")
    w, l_ = cond.embeds.chunk(2)
    assert torch.equal(w, l_)
    empty = r.pipe.encode_prompt([""], device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
    dropped = [bool(torch.allclose(w[i], empty[0])) for i in range(8)]
    assert any(dropped) and not all(dropped)


def test_flip_and_crop_are_joint(tmp_path):
    img = Image.effect_noise((48, 40), 60).convert("RGB")
    rows = [{"caption": "a red circle", "jpg_0": img, "jpg_1": img, "label_0": 1.0}] * 4
    write_pickapic_parquet(tmp_path / "same.parquet", rows)
    ds = PreferencePairs(str(tmp_path / "same.parquet"), resolution=32, center_crop=False)
    item = ds[0]
    assert torch.equal(item["pixels"][0], item["pixels"][1])
    r = recipe_(tmp_path / "r", f"data.train={tmp_path / 'same.parquet'}", "data.eval=null", "data.vae_latents=mean")
    b = batch_of(r, 4)
    x0, *_ = r.inputs.build(b, [r.inputs.generator(s, 0, "train") for s in range(4)], "train")
    torch.testing.assert_close(x0[:, 0], x0[:, 1])


def test_pickapic_ties_labels_and_columns(tmp_path):
    ds = PreferencePairs(PAIRS, resolution=32)
    assert ds.ties == 4 and len(ds) == 92
    rows = synthetic_pairs(3, seed=5)
    rows[1]["label_0"], rows[1]["label_1"] = 0.7, 0.3
    write_pickapic_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(DataError, match="row 1: label_0=0.7"):
        PreferencePairs(str(tmp_path / "bad.parquet"))
    write_pickapic_parquet(tmp_path / "tie.parquet", synthetic_pairs(3, ties=1))
    with pytest.raises(DataError, match="row 0 is a tie"):
        PreferencePairs(str(tmp_path / "tie.parquet"), drop_ties=False)
    rows = [{k: v for k, v in r.items() if k != "caption"} for r in synthetic_pairs(2)]
    write_pickapic_parquet(tmp_path / "nocap.parquet", rows)
    with pytest.raises(DataError, match=r"missing column\(s\) \['caption'\]"):
        PreferencePairs(str(tmp_path / "nocap.parquet"))


def test_winner_first_after_swap():
    ds = PreferencePairs(PAIRS, resolution=32)
    from mmalign.toyworld.world import oracle_score

    for i in range(12):
        a, b = ds.load_images(i)
        cap = ds.ds[ds.rows[i]]["caption"]
        assert oracle_score(a, cap) > oracle_score(b, cap)


def test_corrupt_image_is_reported_and_skipped(tmp_path, capsys):
    rows = synthetic_pairs(6, seed=2)
    rows[2]["jpg_1"] = b"not an image"
    write_pickapic_parquet(tmp_path / "c.parquet", rows)
    ds = PreferencePairs(str(tmp_path / "c.parquet"), resolution=32)
    batch = ds.collate([ds[i] for i in range(4)])
    assert len(batch) == 3 and batch.skipped == 1
    err = capsys.readouterr().err  # on stderr, where users look (no logger nobody configured)
    assert ds.skipped_rows == [2] and "warning: " in err and "row 2: unreadable image" in err
    # and training goes on over it
    res = run(cfg_(tmp_path / "run", f"data.train={tmp_path / 'c.parquet'}", "data.eval=null", "train.max_steps=3",
                   "train.batch_size=2", "train.eval_every=0"))
    assert res.step == 3


def test_imagefolder_layout(tmp_path):
    rows = synthetic_pairs(4, seed=3)
    meta = []
    for i, r in enumerate(rows):
        for k in ("0", "1"):
            r[f"jpg_{k}"].save(tmp_path / f"{i}_{k}.png")
        meta.append({"caption": r["caption"], "file_name_0": f"{i}_0.png", "file_name_1": f"{i}_1.png",
                     "label_0": r["label_0"]})
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta))
    ds = PreferencePairs(str(tmp_path), resolution=32)
    assert len(ds) == 4 and ds[0]["pixels"].shape == (2, 3, 32, 32)


def test_precomputed_needs_noise_draws(tmp_path):
    with pytest.raises(ConfigError, match="noise_draws"):
        cfg_(tmp_path, "model.reference=precomputed")


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    common = ["train.max_steps=6", "train.eval_every=0", "train.optimizer=adamw", "data.eval=null",
              "data.caption_dropout=0.3"]
    full = recipe_(tmp_path / "full", *common)
    train(full, full.cfg.train, full.acc)

    a = recipe_(tmp_path / "run", *common)

    def stop(step, rec):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(a, a.cfg.train, a.acc, on_step=stop)
    b = recipe_(tmp_path / "run", *common, "train.resume=latest")
    train(b, b.cfg.train, b.acc)
    for (n1, p1), (n2, p2) in zip(full.unet.named_parameters(), b.unet.named_parameters()):
        if p1.requires_grad:
            assert torch.equal(p1, p2), n1


def test_lora_export_loads_with_load_lora_weights(tmp_path):
    res = run(cfg_(tmp_path, "train.max_steps=3", "train.eval_every=0", "train.lr=0.05"))
    trained = res.recipe
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").exists()
    assert "load_lora_weights" in (tmp_path / "final" / "README.md").read_text()
    comp = tiny_components("sd", seed=0, sample_size=16)  # a fresh base, as a user would load it
    pipe = comp.pipeline()
    pipe.load_lora_weights(str(tmp_path / "final"))
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([10, 500])
    cond = torch.randn(2, 16, 32)
    with torch.no_grad():
        a = pipe.unet(x, t, encoder_hidden_states=cond).sample
        b = trained.unet(x, t, encoder_hidden_states=cond).sample
        base = tiny_components("sd", seed=0, sample_size=16).unet(x, t, encoder_hidden_states=cond).sample
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(a, base, atol=1e-4)


def test_full_export_is_a_diffusers_pipeline(tmp_path):
    res = run(cfg_(tmp_path, "model.lora=null", "train.max_steps=2", "train.eval_every=0", "model.ema=true",
                   "model.ema_decay=0.5"))
    comp = load_components("sd", str(tmp_path / "final"))
    ema = res.recipe.ema
    for p_loaded, s in zip(comp.unet.parameters(), ema.shadow_params):
        torch.testing.assert_close(p_loaded, s)  # the export holds the EMA weights
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "final"), safety_checker=None)
    img = pipe("a red circle", num_inference_steps=2, height=32, width=32).images[0]
    assert img.size == (32, 32)


def test_sdxl_tiny_trains_and_exports_lora(tmp_path):
    res = run(cfg_(tmp_path, "model.kind=sdxl", "train.max_steps=2", "train.eval_every=2",
                   "validation.prompts=[a red circle]", "validation.num_inference_steps=2"))
    assert (tmp_path / "samples" / "step-00000002.png").exists()
    comp = tiny_components("sdxl", seed=0, sample_size=16)
    comp.pipeline().load_lora_weights(str(tmp_path / "final"))
    assert math.isfinite(res.history[-1]["train/loss"])


def test_latent_cache_matches_pixels_and_resumes(tmp_path):
    base = ["data.max_examples=10", "data.eval=null"]
    r_pix = recipe_(tmp_path / "pix", *base)
    r_cache = recipe_(tmp_path / "c", *base, f"data.cache_dir={tmp_path / 'cache'}")
    for step in (0, 1, 2, 3):  # covers flipped and unflipped draws
        lp = r_pix.compute(batch_of(r_pix, 6), step=step).metrics["model_mse_w"]
        lc = r_cache.compute(batch_of(r_cache, 6), step=step).metrics["model_mse_w"]
        torch.testing.assert_close(lp, lc, rtol=1e-4, atol=1e-6)  # fp32 storage: batch-order rounding only
    (shard,) = (tmp_path / "cache").glob("train-*/shard-00000.safetensors")  # <cache_dir>/<split>-<key>
    mtime = shard.stat().st_mtime
    recipe_(tmp_path / "c2", *base, f"data.cache_dir={tmp_path / 'cache'}")
    assert shard.stat().st_mtime == mtime  # resumable: complete shards are not rebuilt


def test_xformers_request_without_xformers_is_a_clear_error(tmp_path):
    import importlib.util

    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers installed")
    with pytest.raises(ImportError, match="model.attention=xformers needs xformers"):
        recipe_(tmp_path, "model.attention=xformers")


def test_bf16_autocast_path_runs_on_cpu(tmp_path):
    res = run(cfg_(tmp_path, "train.mixed_precision=bf16", "train.max_steps=2", "train.eval_every=0"))
    assert math.isfinite(res.history[-1]["train/loss"])


def test_validation_grid_and_scorer(tmp_path):
    from mmalign.toyworld.world import oracle_score

    res = run(cfg_(tmp_path, "train.max_steps=1", "train.eval_every=1", "validation.prompts=[a red circle]"),
              scorer=lambda ims, ps: [oracle_score(i, p) for i, p in zip(ims, ps)])
    assert (tmp_path / "samples" / "step-00000000.png").exists()
    assert "eval/reward" in res.eval_history[0]
    grid = Image.open(tmp_path / "samples" / "step-00000001.png")
    assert grid.size[0] > 32
    buf = io.BytesIO()
    grid.save(buf, format="PNG")


@pytest.mark.parametrize("script,config", [("scripts/train_sdxl_dpo.sh", "diffusion_dpo"),
                                           ("scripts/train_sd15_dpo.sh", "diffusion_dpo"),
                                           ("scripts/train_sd35_dpo.sh", "flow_dpo"),
                                           ("scripts/train_flux_dpo.sh", "flux_dpo")])
def test_launch_scripts_run_as_is(tmp_path, script, config):
    """The GPU launch scripts, run unchanged on CPU with the tiny config of the same family swapped in."""
    import os
    import subprocess

    env = dict(os.environ, CONFIG=f"configs/tiny/{config}.yaml", DATA="assets/data/shapes_pairs/train.parquet",
               NUM_GPUS="1", GLOBAL="4", BATCH="4", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    r = subprocess.run(["bash", script, f"train.output_dir={tmp_path}", "train.max_steps=1", "train.eval_every=0",
                        "validation.prompts=[]"], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pairs/step" in r.stdout and (tmp_path / "final" / "pytorch_lora_weights.safetensors").exists()


def test_all_unreadable_batch_skips_the_step_not_the_run(tmp_path):
    rows = synthetic_pairs(6, seed=2)
    for i in range(4):
        rows[i]["jpg_0"] = b"broken"
    write_pickapic_parquet(tmp_path / "c.parquet", rows)
    res = run(cfg_(tmp_path / "run", f"data.train={tmp_path / 'c.parquet'}", "data.eval=null", "train.max_steps=6",
                   "train.batch_size=2", "train.eval_every=0", "train.log_every=1",
                   "train.max_unreadable_fraction=0.9"))  # 4 of 6 rows unreadable: above the default limit
    assert res.step == 6
    last = res.history[-1]
    assert last["train/skipped_rows"] == 8  # 4 unreadable rows x 2 epochs
    assert last["train/skipped_steps"] >= 1  # at least one batch had no readable row


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_complete_cache_leaves_vae_and_text_encoders_on_disk(tmp_path, kind, monkeypatch):
    """First run: builds the cache, then drops the VAE / text encoders. A later run on the finished cache never
    loads them for its steps (same losses); validation and a full export read them back when they need them."""
    from mmalign.diffusion import models
    from mmalign.diffusion.models import save_components

    loads = []
    real = models._load_frozen
    monkeypatch.setattr(models, "_load_frozen", lambda *a: loads.append(1) or real(*a))
    model = tmp_path / "model"
    save_components(tiny_components(kind, seed=0, sample_size=16), model)
    base = [f"model.kind={kind}", f"model.name_or_path={model}", "model.tiny=null", "data.max_examples=6",
            "data.eval=null", f"data.cache_dir={tmp_path / 'cache'}"]
    first = recipe_(tmp_path / "a", *base)
    assert len(loads) == 1 and first.comp.vae is None and first.comp.text_encoder is None  # dropped once cached
    later = recipe_(tmp_path / "b", *base)
    assert len(loads) == 1 and later.comp.text_encoder_2 is None  # never read
    loss = lambda r: torch.stack([r.compute(batch_of(r, 4), step=s).loss.detach() for s in (0, 1)])  # noqa: E731
    torch.testing.assert_close(loss(first), loss(later), rtol=0, atol=1e-6)
    imgs = later.sample(["a red circle"], [0], steps=2, guidance=1.0, resolution=32)  # reads them back
    assert imgs[0].size == (32, 32) and later.comp.vae is not None and len(loads) == 2
    full = recipe_(tmp_path / "c", *base, "model.lora=null")
    assert full.comp.vae is None
    full.export(tmp_path / "full")  # a full pipeline folder needs them: read back, written out
    assert (tmp_path / "full" / "vae").is_dir() and (tmp_path / "full" / "text_encoder").is_dir()
    load_components(kind, str(tmp_path / "full"))


def test_channels_last_gives_the_same_scores(tmp_path):
    a, b = recipe_(tmp_path / "a"), recipe_(tmp_path / "b", "model.channels_last=true")
    assert b.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not a.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for step in (0, 1):
        ma, mb = (r.compute(batch_of(r), step=step).metrics for r in (a, b))
        torch.testing.assert_close(ma["model_mse_w"], mb["model_mse_w"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ma["ref_mse_l"], mb["ref_mse_l"], rtol=1e-4, atol=1e-6)


def test_compile_runs_the_compiled_module_with_the_same_scores(tmp_path, monkeypatch):
    """``model.compile=true``: the step goes through ``torch.compile``'s module (here with the eager backend,
    so the test needs no C++ toolchain and checks our wiring, not inductor) and scores as the plain UNet."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **k: real(m, backend="eager"))
    a, b = recipe_(tmp_path / "a"), recipe_(tmp_path / "b", "model.compile=true")
    assert a.model is a.unet and b.model is b.compiled and b.compiled is not None
    ma, mb = (r.compute(batch_of(r), step=0).metrics for r in (a, b))
    torch.testing.assert_close(ma["model_mse_w"], mb["model_mse_w"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ma["ref_mse_l"], mb["ref_mse_l"], rtol=1e-5, atol=1e-7)


def test_precomputed_reference_table_is_kept_and_reused(tmp_path, monkeypatch):
    """The table lands in data.cache_dir; a run that changes only beta / lr / LoRA rank reads it instead of
    recomputing (same scores); a different seed (other noise draws) computes its own."""
    base = ["data.max_examples=6", "data.eval=null", f"data.cache_dir={tmp_path / 'cache'}",
            "model.reference=precomputed", "data.noise_draws=2"]
    first = recipe_(tmp_path / "a", *base)
    tables = sorted((tmp_path / "cache" / "reference").glob("train-*.safetensors"))
    assert len(tables) == 1
    calls = []
    real = DiffusionRecipe.precompute
    monkeypatch.setattr(DiffusionRecipe, "precompute", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    sweep = recipe_(tmp_path / "b", *base, "loss.beta=100", "train.lr=0.5", "model.lora.r=2")
    assert calls == []
    torch.testing.assert_close(sweep.reference.tables["train"]["mse"], first.reference.tables["train"]["mse"])
    torch.testing.assert_close(sweep.reference.tables["train"]["mse"],
                               real(sweep, sweep.train_data, "train", 2), rtol=0, atol=1e-6)
    recipe_(tmp_path / "c", *base, "train.seed=7")
    assert calls == [1] and len(list((tmp_path / "cache" / "reference").glob("train-*.safetensors"))) == 2


def test_reference_record_is_read_by_a_later_run_of_a_sweep(tmp_path, monkeypatch):
    """model.reference_record: a run keeps the reference scores its steps computed in data.cache_dir; a later run
    on the same data and seed (another beta and lr: a sweep) reads them instead of running the reference forward
    and trains exactly as it does without the record; an eval repeats its draws, so each eval after the first
    reads them; another seed draws other noise and computes its own."""
    calls = []
    real = DiffusionRecipe._ref_mse
    monkeypatch.setattr(DiffusionRecipe, "_ref_mse", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))

    def run_(name, *ov):
        calls.clear()
        res = run(cfg_(tmp_path / name, "data.max_examples=8", f"data.cache_dir={tmp_path / 'cache'}",
                       "train.max_steps=3", "train.eval_every=1", "train.batch_size=4", *ov))
        losses = [(h["step"], h.get("train/loss"), h.get("eval/loss")) for h in res.history]
        return len(calls), losses

    unrecorded, _ = run_("none", "model.reference_record=false")
    assert not list((tmp_path / "cache" / "reference").glob("*"))
    first, _ = run_("first")
    evals = first - 3  # 3 steps, and only the first of the 4 evals (before step 1 and after each step) computes
    assert evals >= 1 and unrecorded == 3 + 4 * evals
    sweep = ["loss.beta=1000", "train.lr=0.01", "model.lora.r=2"]
    n, recorded = run_("sweep", *sweep)
    assert n == 0  # every step's and every eval's reference scores came from the record
    _, computed = run_("sweep-unrecorded", *sweep, "model.reference_record=false")
    assert recorded == computed and any(x[1] is not None for x in recorded)  # the same losses, to the bit
    n, _ = run_("seed", "train.seed=7")
    assert n == 3 + evals  # other draws: computed (and recorded) anew
    for f in (tmp_path / "cache" / "reference").glob("*-steps-*.safetensors"):
        f.write_bytes(b"torn by a kill")  # an unreadable record is recomputed, never trusted
    n, again = run_("sweep-torn", *sweep)
    assert n == 3 + evals and again == recorded


def test_grid_labels_wrap_instead_of_being_cut():
    """Grid labels (validation, online rounds) once showed 'a red circ': every character now appears, within the cell."""
    from PIL import Image, ImageDraw

    from mmalign.diffusion.data import make_grid, wrap_label

    d = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for text in ["a red circle", "an orange square next to a blue triangle", "supercalifragilisticexpialidocious x"]:
        lines = wrap_label(text, 62, d)
        assert all(d.textlength(x) <= 62 for x in lines), lines
        assert "".join(lines).replace(" ", "") == text.replace(" ", "")
    assert wrap_label("a green triangle", 62, d) == ["a green", "triangle"]
    one = make_grid([Image.new("RGB", (64, 64))] * 2, cols=2, labels=["a red", "a red"])
    two = make_grid([Image.new("RGB", (64, 64))] * 2, cols=2, labels=["a green triangle", "a red"])
    assert two.size[1] == one.size[1] + 11  # the longest label's second line gets its own row of text
