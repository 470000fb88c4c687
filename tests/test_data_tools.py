"""FiFA filtering, DCPO caption strategies, RPO pair building: the distinguishing computations + CLIs."""
import math
import random
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest

from mmalign.diffusion.captions import LEXICON, WORD_CATEGORY, add_dual_captions, perturb_caption, world_captioner
from mmalign.diffusion.fifa import fifa_filter, fifa_select, heuristic_quality, kl_entropy, knn_log_distances
from mmalign.toyworld.world import is_correct
from mmalign.diffusion.data import load_pairs_table, open_image
from mmalign.rewards import load_reward

ROOT = Path(__file__).resolve().parents[1]
PAIRS = "assets/data/shapes_pairs/train.parquet"


def test_heuristic_quality():
    assert heuristic_quality("") == 0.0
    assert heuristic_quality("a red circle on a dark background") == pytest.approx(1.0)
    assert heuristic_quality("red") == pytest.approx(1 / 3)
    assert heuristic_quality("red red red red") == pytest.approx(0.25)
    assert heuristic_quality("a nude figure") < 0.2
    assert heuristic_quality("### $$$ %%% a cat") < heuristic_quality("a cat on a mat")


def test_knn_distances_and_entropy():
    pts = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    np.testing.assert_allclose(knn_log_distances(pts, 1), np.log([1.0, 1.0, 2.0]), atol=1e-9)
    u = np.random.default_rng(0).random((4000, 1))  # uniform on [0, 1]: differential entropy 0
    assert abs(kl_entropy(u, 5)) < 0.05
    g = np.random.default_rng(1).normal(size=(4000, 2))  # standard 2-D normal: log(2 pi e) = 2.8379
    assert kl_entropy(g, 5) == pytest.approx(math.log(2 * math.pi * math.e), abs=0.08)


def test_fifa_select_margin_quality_diversity():
    margin = np.array([0.1, 0.9, 0.5, 0.8, 0.2])
    emb = np.eye(5)
    r = fifa_select(margin, np.ones(5), emb, top_k=2, alpha=0, gamma=0)
    assert list(r.selected) == [1, 3]  # highest margins
    emb_dup = np.array([[0, 0], [0, 0], [5, 5], [0, 0], [9, 0]], float)  # rows 0, 1, 3 share a prompt
    r = fifa_select(margin, np.ones(5), emb_dup, top_k=2, alpha=0, gamma=1.0, k=1)
    assert set(r.selected) == {2, 4}  # duplicated prompts have rho = 0 -> pushed out by diversity
    q = np.array([1.0, 0.0, 1.0, 0.0, 1.0])
    r = fifa_select(np.zeros(5), q, emb, top_k=3, alpha=1.0, gamma=0)
    assert set(r.selected) == {0, 2, 4}
    assert r.report["selected"] == 3 and r.report["rows"] == 5


def test_fifa_filter_on_pairs_and_cli(tmp_path):
    table, _ = load_pairs_table(PAIRS)
    out, res = fifa_filter(table, load_reward("clipscore", tiny=True), fraction=0.25)
    assert len(out) == round(0.25 * 92) and res.report["ties_dropped"] == 4
    r = subprocess.run([sys.executable, "-m", "mmalign", "data", "fifa", "--data", PAIRS, "--reward", "clipscore",
                        "--tiny", "--fraction", "0.5", "--out", str(tmp_path / "f.parquet"), "--report",
                        str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(datasets.Dataset.from_parquet(str(tmp_path / "f.parquet"))) == 46 and "mean margin" in r.stdout


def test_perturbation_levels():
    rng = random.Random(0)
    text = "a small red circle on the left at night"
    for level, n in (("weak", 1), ("medium", 2), ("strong", 3)):
        out = perturb_caption(text, level, random.Random(1))
        a, b = text.split(), out.split()
        assert len(a) == len(b)
        changed = [(x, y) for x, y in zip(a, b) if x != y]
        assert len(changed) == n
        assert all(WORD_CATEGORY[x] == WORD_CATEGORY[y] for x, y in changed)  # same-category substitutions
    assert perturb_caption("a red circle", "weak", random.Random(3)) != "a red circle"
    assert perturb_caption("photograph of something", "weak", rng) != "photograph of something"
    assert perturb_caption(text, "medium", random.Random(5)) == perturb_caption(text, "medium", random.Random(5))
    assert set(LEXICON["color"]) >= {"red", "blue"}
    with pytest.raises(ValueError, match="level"):
        perturb_caption(text, "extreme")


@pytest.mark.parametrize("strategy", ["captioning", "perturbation", "hybrid"])
def test_dual_captions_go_to_the_right_images(strategy):
    table, _ = load_pairs_table(PAIRS)
    table = table.select(range(12))
    out = add_dual_captions(table, strategy, "weak", world_captioner("shapes"), seed=0)
    keep = [i for i in range(12) if table[i]["label_0"] != 0.5]
    assert len(out) == len(keep)
    for row in out:
        w0 = row["label_0"] == 1.0
        win_cap, lose_cap = (row["caption_0"], row["caption_1"]) if w0 else (row["caption_1"], row["caption_0"])
        assert win_cap == row["caption"]  # the preferred image keeps the prompt
        assert lose_cap != row["caption"]
        loser = open_image(row["jpg_1"] if w0 else row["jpg_0"])
        if strategy == "captioning":  # the describer is right about the rejected image
            assert is_correct(loser, lose_cap)


def test_dcpo_cli(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mmalign", "data", "dcpo", "--data", PAIRS, "--strategy", "captioning",
                        "--captioner", "world:shapes", "--out", str(tmp_path / "d.parquet")], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    t = datasets.Dataset.from_parquet(str(tmp_path / "d.parquet"))
    assert {"caption_0", "caption_1"} <= set(t.column_names) and len(t) == 92


def test_rpo_pairs_from_a_subject_folder(tmp_path):
    from mmalign.diffusion.models import save_components, tiny_components
    from mmalign.diffusion.subject import build_rpo_pairs, load_subject_folder
    from mmalign.toyworld.world import make_dataset

    subj = tmp_path / "subject"
    subj.mkdir()
    for i, (im, _, _) in enumerate(make_dataset(3, seed=2)):
        im.save(subj / f"{i}.png")
    (subj / "prompts.txt").write_text("a red circle in the snow\na red circle on a beach\n")
    refs, prompts = load_subject_folder(subj)
    assert len(refs) == 3 and len(prompts) == 2
    comp = tiny_components("sd")
    reward = load_reward("lambda_harmonic", tiny=True, lam=0.0)
    rows = build_rpo_pairs(comp.pipeline(), refs, prompts, reward, per_prompt=4, steps=2, resolution=32)
    assert len(rows) == 8 and {r["label_0"] for r in rows} <= {0.0, 1.0}
    assert all(r["label_0"] + r["label_1"] == 1 for r in rows)
    save_components(comp, tmp_path / "pipe")
    r = subprocess.run([sys.executable, "-m", "mmalign", "data", "rpo-pairs", "--subject", str(subj), "--model",
                        str(tmp_path / "pipe"), "--tiny-reward", "--per-prompt", "2", "--steps", "2", "--resolution", "32",
                        "--out", str(tmp_path / "rpo.parquet")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (subj / "prompts.txt").unlink()
    with pytest.raises(FileNotFoundError, match="prompts.txt"):
        load_subject_folder(subj)
