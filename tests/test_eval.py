"""``mmalign sample`` + ``mmalign eval`` on the shipped shapes model: base vs a LoRA trained here, several
rewards, intervals and win rates, the gallery; bad input is a clear error."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmalign.cli import main
from mmalign.data.prompts import load_prompts
from mmalign.data.records import DataError
from mmalign.diffusion.sampling import apply_lora, load_pipeline
from mmalign.eval.sampling import sample_to_folder
from mmalign.eval.report import write_gallery
from mmalign.eval.stats import bootstrap_ci, diversity_rows, summarize_scores, wins
from mmalign.train.diffusion import run
from mmalign.train.sections import load_config

SHAPES = "assets/models/shapes-sd"


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A LoRA on the shipped shapes model, trained a few steps (the demo's recipe, shortened)."""
    out = tmp_path_factory.mktemp("lora")
    run(load_config("configs/tiny/diffusion_dpo.yaml", [
        "model.tiny=null", f"model.name_or_path={SHAPES}", f"train.output_dir={out}", "train.max_steps=6",
        "train.lr=3e-3", "train.eval_every=0", "validation.prompts=[]", "data.vae_latents=mean", "train.progress=false"]))
    return out / "final"


def test_sample_then_eval_base_vs_lora_end_to_end(tmp_path, lora, capsys):
    args = ["eval", "--base", SHAPES, "--tuned", f"dpo={lora}", "--prompts", "shapes", "--max-prompts", "6",
            "--seeds", "0", "1", "--reward", "world", "--reward", "imagereward", "--tiny", "--steps", "4",
            "--out", str(tmp_path)]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "win rate vs base" in table and "imagereward" in table and "dpo" in table
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["items"] == 12 and summary["models"] == ["base", "dpo"]
    rows = {(r["reward"], r["model"]): r for r in summary["rows"]}
    for rw in ("world", "imagereward"):
        b, t = rows[(rw, "base")], rows[(rw, "dpo")]
        assert b["ci_low"] <= b["mean"] <= b["ci_high"] and 0 <= t["win_rate"] <= 1
        assert t["win_low"] <= t["win_rate"] <= t["win_high"]
    div = rows[("diversity", "dpo")]  # 6 prompts x 2 seeds: per-prompt diversity of every model
    assert rows[("diversity", "base")]["n"] == 6 and isinstance(div["fell"], bool) and 0 <= div["win_rate"] <= 1
    lines = (tmp_path / "scores.csv").read_text().splitlines()
    assert len(lines) == 1 + 24 and lines[0].split(",")[:4] == ["model", "prompt", "seed", "file"]
    meta = [json.loads(x) for x in (tmp_path / "samples" / "dpo" / "metadata.jsonl").read_text().splitlines()]
    assert meta[0]["lora"] == str(lora) and meta[0]["seed"] == 0 and meta[0]["prompt"] == "a red circle"
    assert "<figure>" in (tmp_path / "gallery.html").read_text()
    # the LoRA changed the images: same prompt and seed, different pixels
    a = np.asarray(Image.open(tmp_path / "samples" / "base" / meta[0]["file_name"]))
    b = np.asarray(Image.open(tmp_path / "samples" / "dpo" / meta[0]["file_name"]))
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 0.5
    # resumable: a second run samples nothing new (files untouched) and scores again
    mtime = (tmp_path / "samples" / "dpo" / meta[0]["file_name"]).stat().st_mtime
    assert main([*args[:-2], "--reward", "toy_clip", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "samples" / "dpo" / meta[0]["file_name"]).stat().st_mtime == mtime
    # and score reads a sampled folder's metadata.jsonl directly (prompts included)
    assert main(["score", "--reward", "world", "--images", str(tmp_path / "samples" / "dpo"),
                 "--out", str(tmp_path / "s.csv")]) == 0


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    from mmalign.diffusion.models import save_components, tiny_components

    # a LoRA trained on another architecture (the tiny random SD: other widths) does not fit the shapes model
    run(load_config("configs/tiny/diffusion_dpo.yaml", [f"train.output_dir={tmp_path / 'other'}", "train.max_steps=1",
                                                        "train.eval_every=0", "validation.prompts=[]",
                                                        "train.progress=false"]))
    with pytest.raises(DataError, match="does not fit"):
        load_pipeline(SHAPES, str(tmp_path / "other" / "final"))
    pipe, _ = load_pipeline(SHAPES)
    with pytest.raises(DataError, match="no pytorch_lora_weights.safetensors"):
        apply_lora(pipe, str(tmp_path))
    with pytest.raises(DataError, match="prompt file not found"):
        load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="unknown prompt set 'partyprompts'"):
        load_prompts("partyprompts")
    with pytest.raises(DataError, match="prompt set 'partiprompts' is not on this machine"):
        load_prompts("partiprompts")
    # folders sampled on different seeds cannot be paired
    save_components(tiny_components("sd"), tmp_path / "tiny")
    p, _ = load_pipeline(str(tmp_path / "tiny"))
    sample_to_folder(p, ["a red circle"], [0, 1], tmp_path / "a", steps=2, resolution=32, progress=False)
    sample_to_folder(p, ["a red circle"], [0, 2], tmp_path / "b", steps=2, resolution=32, progress=False)
    assert main(["eval", "--folder", f"base={tmp_path / 'a'}", "--folder", f"t={tmp_path / 'b'}", "--reward", "world",
                 "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert "were not sampled on the same (prompt, seed) items" in err and "only in base" in err
    assert main(["eval", "--folder", f"base={tmp_path / 'a'}", "--reward", "world", "--out", str(tmp_path / "e")]) == 1
    assert main(["sample", "--model", str(tmp_path / "tiny"), "--prompts", "nope", "--out", str(tmp_path / "x")]) == 1


def test_statistics_hand_values():
    assert wins([1, 2, 3], [1, 1, 4]).tolist() == [0.5, 1.0, 0.0]  # tie counts half
    lo, hi = bootstrap_ci([1.0] * 10)
    assert lo == hi == 1.0
    lo, hi = bootstrap_ci(np.arange(100.0))
    assert lo < 49.5 < hi and hi - lo < 25
    rows = summarize_scores({"base": {"r": [0.1, 0.2, 0.3, 0.4]}, "t": {"r": [0.2, 0.2, 0.5, 0.5]}})
    t = rows[1]
    assert t["win_rate"] == pytest.approx((1 + 0.5 + 1 + 1) / 4) and t["mean"] == pytest.approx(0.35)
    with pytest.raises(ValueError, match="differ in length"):
        wins([1, 2], [1])


def test_gallery_escapes_prompts(tmp_path):
    im = Image.new("RGB", (8, 8))
    rows = summarize_scores({"base": {"<b>r</b>": [0.1]}, "<i>t</i>": {"<b>r</b>": [0.2]}})
    write_gallery(tmp_path / "g.html", [{"prompt": "<script>alert(1)</script>", "seed": 0,
                                          "images": {"base": im, "<i>t</i>": im},
                                          "scores": {"base": {"<b>r</b>": 0.1}, "<i>t</i>": {"<b>r</b>": 0.2}}}],
                  ["base", "<i>t</i>"], rows)
    h = (tmp_path / "g.html").read_text()
    assert "<script>" not in h and "&lt;script&gt;" in h and "<i>t</i>" not in h and "<b>r</b>" not in h


def test_eval_with_relative_folders(tmp_path, monkeypatch, capsys):
    """Folders given relative to the working directory (as users type them): file names in metadata.jsonl
    are relative to their folder and must be joined once (a doubled path once broke `mmalign eval --out runs/x`)."""
    from mmalign.diffusion.models import save_components, tiny_components

    save_components(tiny_components("sd"), tmp_path / "tiny")
    p, _ = load_pipeline(str(tmp_path / "tiny"))
    monkeypatch.chdir(tmp_path)
    for name in ("a", "b"):
        sample_to_folder(p, ["a red circle", "a blue square"], [0, 1], f"runs/{name}", steps=2, resolution=32,
                         progress=False)
    assert main(["eval", "--folder", "base=runs/a", "--folder", "t=runs/b", "--reward", "world",
                 "--out", "runs/e"]) == 0
    assert "win rate vs base" in capsys.readouterr().out
    assert (tmp_path / "runs/e/summary.json").exists()


def test_diversity_rows_flag_a_model_whose_samples_collapsed():
    rng = np.random.default_rng(0)
    keys = [(p, k) for p in ("a", "b", "c", "d", "e", "f") for k in range(4)]
    noise = lambda: Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))  # noqa: E731
    same = Image.fromarray(np.full((16, 16, 3), 128, np.uint8))
    images = {"base": [noise() for _ in keys], "varied": [noise() for _ in keys], "collapsed": [same for _ in keys]}
    rows = {r["model"]: r for r in diversity_rows(images, keys, "base")}
    assert rows["base"]["n"] == 6 and "fell" not in rows["base"]
    assert rows["collapsed"]["mean"] == 0.0 and rows["collapsed"]["fell"] and rows["collapsed"]["win_rate"] == 0.0
    assert not rows["varied"]["fell"]
    assert diversity_rows(images, [(p, 0) for p in "abcdef" for _ in range(4)][:1], "base") == []  # no prompt has 2 seeds


def test_eval_warns_when_a_tuned_folder_lost_its_diversity(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for name, collapsed in (("base", False), ("tuned", True)):
        d = tmp_path / name
        d.mkdir()
        rows = []
        for p in range(6):
            for k in range(3):
                px = np.full((16, 16, 3), 90, np.uint8) if collapsed else rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(px).save(d / f"{p}-{k}.png")
                rows.append(json.dumps({"file_name": f"{p}-{k}.png", "prompt": f"prompt {p}", "seed": k}))
        (d / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    assert main(["eval", "--folder", f"base={tmp_path / 'base'}", "--folder", f"tuned={tmp_path / 'tuned'}",
                 "--reward", "saturation", "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "diversity" in out and "warning: tuned: per-prompt diversity 0.0000" in out
    rows = json.loads((tmp_path / "e" / "summary.json").read_text())["rows"]
    assert [r["fell"] for r in rows if r["reward"] == "diversity" and r["model"] == "tuned"] == [True]
    # the semantic measure too: DINO embeddings (tiny random weights here) of identical images are identical
    assert main(["eval", "--folder", f"base={tmp_path / 'base'}", "--folder", f"tuned={tmp_path / 'tuned'}",
                 "--reward", "saturation", "--diversity", "dino", "--tiny", "--out", str(tmp_path / "f")]) == 0
    out = capsys.readouterr().out
    assert "diversity_dino" in out and "warning: tuned: per-prompt diversity (dino) 0.0000" in out
    rows = json.loads((tmp_path / "f" / "summary.json").read_text())["rows"]
    dino = {r["model"]: r for r in rows if r["reward"] == "diversity_dino"}
    assert dino["base"]["mean"] > 0 and dino["tuned"]["fell"] is True
    page = (tmp_path / "f" / "gallery.html").read_text()
    assert page.count('<tr class="fell">') == 2 and "FELL below base" in page  # pixel and DINO rows, marked
    # the diversity rewards are those rows: asked for with --reward, each is shown once (not a second, per-image row)
    assert main(["eval", "--folder", f"base={tmp_path / 'base'}", "--folder", f"tuned={tmp_path / 'tuned'}",
                 "--reward", "saturation", "--reward", "diversity", "--reward", "diversity_dino", "--tiny",
                 "--out", str(tmp_path / "g")]) == 0
    assert "shown once, as that row" in capsys.readouterr().err
    rows = json.loads((tmp_path / "g" / "summary.json").read_text())["rows"]
    assert sorted(r["reward"] for r in rows if r["model"] == "tuned") == ["diversity", "diversity_dino", "saturation"]
    # and so from Python: evaluate_folders itself treats them as those rows
    from mmalign.eval.folders import evaluate_folders

    res = evaluate_folders({"base": tmp_path / "base", "tuned": tmp_path / "tuned"}, ["saturation", "diversity",
                           "diversity_dino"], tmp_path / "h", tiny=True, device="cpu")
    assert sorted(r["reward"] for r in res["rows"] if r["model"] == "tuned") == ["diversity", "diversity_dino",
                                                                                 "saturation"]
    assert set(res["scores"]["tuned"]) == {"saturation"}


def test_feature_diversity_hand_values():
    """(1 - cos) / 2 averaged over the pairs: identical 0, orthogonal 0.5, opposite 1."""
    import torch

    from mmalign.rewards.signals import feature_diversity

    e = torch.eye(3)
    assert feature_diversity(torch.stack([e[0], e[0], e[0]])) == pytest.approx(0.0, abs=1e-7)
    assert feature_diversity(e) == pytest.approx(0.5)
    assert feature_diversity(torch.stack([e[0], -e[0]])) == pytest.approx(1.0)
    assert feature_diversity(torch.stack([2 * e[0], e[1]])) == pytest.approx(0.5)  # scale-free
    assert np.isnan(feature_diversity(e[:1]))


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's InceptionV3 with random weights (its real ones are a download), written where
    ``feature_extractor_weights_path`` reads them. Convolutions He-initialised so the 2048 features stay alive."""
    import inspect
    from unittest import mock

    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as tf  # a test dependency (pyproject [test])

    def random_state(*a, **k):
        me = inspect.currentframe().f_back.f_locals["self"]  # the extractor being built: its own layers
        for mod in me.modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
        return me.state_dict()

    torch.manual_seed(0)
    with mock.patch.object(tf, "load_state_dict_from_url", random_state):
        fe = tf.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(fe.state_dict(), path)
    return str(path)


def _noise_folder(d, n, shift, seed):
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.fromarray((rng.integers(0, 156, (32, 32, 3)) + shift).astype(np.uint8)).save(d / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "prompt": f"prompt {i}", "seed": 0}))
    (d / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return d


def test_fid_and_kid_through_torch_fidelity(tmp_path, inception_weights):
    """A folder against itself: 0; against another draw of the same distribution: small; against shifted
    colours: large -- torch-fidelity's numbers, passed through."""
    from mmalign.rewards.signals import fid_kid

    a, b, c = (_noise_folder(tmp_path / n, 6, s, seed) for n, s, seed in (("a", 0, 0), ("b", 0, 1), ("c", 100, 2)))
    same, near, far = (fid_kid(a, x, inception_weights) for x in (a, b, c))
    assert abs(same["fid"]) < 1e-3 and abs(same["kid"]) < 1e-3 and same["images"] == same["reference_images"] == 6
    assert far["fid"] > 10 * max(near["fid"], 1e-3) and far["kid"] > near["kid"]


def test_eval_reports_fid_and_kid_against_reference_images(tmp_path, inception_weights, capsys):
    ref = _noise_folder(tmp_path / "ref", 6, 0, 0)
    base, tuned = _noise_folder(tmp_path / "base", 6, 0, 1), _noise_folder(tmp_path / "tuned", 6, 90, 2)
    assert main(["eval", "--folder", f"base={base}", "--folder", f"tuned={tuned}", "--reward", "brightness",
                 "--reference-images", str(ref), "--inception-weights", inception_weights,
                 "--out", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "fid" in out and "kid" in out and "vs 6 reference images" in out
    rows = json.loads((tmp_path / "e" / "summary.json").read_text())["rows"]
    fid = {r["model"]: r["mean"] for r in rows if r["reward"] == "fid"}
    assert fid["tuned"] > fid["base"] > 0  # the shifted colours are further from the reference
    assert "fid" in (tmp_path / "e" / "gallery.html").read_text()
    assert main(["eval", "--folder", f"base={base}", "--folder", f"tuned={tuned}", "--reward", "brightness",
                 "--reference-images", str(tmp_path / "nope"), "--out", str(tmp_path / "f")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--reference-images" in err[0] and "is not a folder" in err[0]
    assert not (tmp_path / "f").exists()  # refused before sampling or scoring anything


def test_fid_without_torch_fidelity_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "torch_fidelity", None)  # as if not installed
    base, tuned = _noise_folder(tmp_path / "base", 4, 0, 1), _noise_folder(tmp_path / "tuned", 4, 0, 2)
    assert main(["eval", "--folder", f"base={base}", "--folder", f"tuned={tuned}", "--reward", "brightness",
                 "--reference-images", str(base), "--out", str(tmp_path / "e")]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "error: FID / KID need torch-fidelity: pip install torch-fidelity"
    assert "Traceback" not in err
