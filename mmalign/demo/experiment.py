"""The demo world's experiment kit, shared by ``mmalign demo`` (``run.py``) and ``scripts/compare_methods.py``:
the base model's samples and oracle-labelled on-policy pairs (``prepare``, cached), the ``diffusion`` recipe
config a method trains with (``demo_config``), and training a fresh copy of the base then comparing it with the
base on the same prompts and seeds (``train_and_evaluate``, tables per split of prompts, ``across_seeds``)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from mmalign.config import config_from_dict, deep_merge
from mmalign.diffusion.data import write_pickapic_parquet
from mmalign.diffusion.models import load_components
from mmalign.diffusion.sampling import detect_kind
from mmalign.eval.sampling import sample_images
from mmalign.eval.stats import wins
from mmalign.rewards.scoring import group_pairs
from mmalign.toyworld.world import all_prompts, is_correct, oracle_score
from mmalign.train.diffusion import run as run_diffusion
from mmalign.train.sections import RECIPES

from .settings import DemoSettings


def oracle(images, prompts) -> list[float]:
    return [oracle_score(i, p) for i, p in zip(images, prompts)]


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], settings: DemoSettings) -> list:
    """The demo's 32 px images with its sampler settings (``mmalign.eval.sampling.sample_images``)."""
    return sample_images(pipe, prompts, seeds, settings.sample_steps, settings.guidance, 32, batch_size=256)


def candidate_pairs(images, prompts, scores, min_margin: float, rng: np.random.Generator) -> list[dict]:
    """Pick-a-Pic rows from scored candidates: per prompt, the i-th best against the i-th worst
    (``rewards.scoring.group_pairs``, ``halves``) when their scores differ by more than ``min_margin``; label_0 is
    randomised so the winner is not always image 0."""
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(i)
    rows = []
    for p, idx in by_prompt.items():
        for w, lo, _ in group_pairs(np.array([scores[i] for i in idx]), "halves", min_margin):
            a, b = idx[w], idx[lo]
            first = bool(rng.random() < 0.5)
            rows.append({"caption": p, "jpg_0": images[a] if first else images[b],
                         "jpg_1": images[b] if first else images[a], "label_0": 1.0 if first else 0.0,
                         "label_1": 0.0 if first else 1.0, "score_0": scores[a] if first else scores[b],
                         "score_1": scores[b] if first else scores[a]})
    return rows


SPLITS = ("held-out prompts", "training prompts", "all prompts")


def summarize(base_scores, tuned_scores, base_ok, tuned_ok, prompts, held_out) -> list[dict]:
    rows = []
    for name, sel in zip(SPLITS, ([p in held_out for p in prompts], [p not in held_out for p in prompts],
                                  [True] * len(prompts))):
        m = np.array(sel)
        b, t = np.array(base_scores)[m], np.array(tuned_scores)[m]
        rows.append({"split": name, "n": int(m.sum()), "base_score": float(b.mean()), "tuned_score": float(t.mean()),
                     "base_accuracy": float(np.array(base_ok)[m].mean()),
                     "tuned_accuracy": float(np.array(tuned_ok)[m].mean()), "win_rate": float(wins(t, b).mean())})
    return rows


def across_seeds(tables: list[list[dict]]) -> list[dict]:
    """Per split: mean, standard deviation and minimum over seeds of the tuned metrics."""
    out = []
    for name in SPLITS:
        rs = [next(r for r in t if r["split"] == name) for t in tables]
        row = {"split": name, "n": rs[0]["n"], "base_score": rs[0]["base_score"], "base_accuracy": rs[0]["base_accuracy"]}
        for k in ("tuned_score", "tuned_accuracy", "win_rate"):
            v = np.array([r[k] for r in rs])
            row.update({k: float(v.mean()), f"{k}_sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                        f"{k}_min": float(v.min())})
        out.append(row)
    return out


def demo_config(s: DemoSettings, pairs_file: str, out: str, val_prompts: list[str], extra: dict | None = None):
    """The ``diffusion`` recipe config the demo trains with; ``extra`` deep-merges method options."""
    base = {
        "recipe": "diffusion",
        "model": {"kind": detect_kind(s.model), "name_or_path": s.model,
                  **({"lora": {"r": s.lora_rank, "alpha": s.lora_rank}} if s.lora_rank else {})},
        # the demo models were pretrained on VAE posterior means (scripts/pretrain_demo_model.py), and their tiny
        # VAE's posterior std is large (0.37 against a latent std of 1.0), so train on the means too
        "data": {"train": pairs_file, "resolution": 32, "random_flip": True, "vae_latents": "mean",
                 "cache_dir": str(Path(pairs_file).parent / f"cache-{Path(pairs_file).stem}")},
        "loss": {"name": s.loss, "beta": s.beta},
        "train": {"output_dir": out, "max_steps": s.steps, "batch_size": s.batch_size, "lr": s.lr,
                  "eval_every": max(1, s.steps // 6), "log_every": max(1, s.steps // 30), "seed": s.seed,
                  "report_to": ["jsonl"], "max_grad_norm": 1.0},
        "validation": {"prompts": val_prompts, "images_per_prompt": 6, "num_inference_steps": s.sample_steps,
                       "guidance_scale": s.guidance, "seed": 50_000},
    }
    return config_from_dict(deep_merge(base, extra or {}), RECIPES)


PREP_KEYS = ("model", "candidates", "min_margin", "eval_seeds", "guidance", "sample_steps", "held_out")


def _save_images(path: Path, images):
    np.savez_compressed(path, *[np.asarray(im) for im in images])


def _load_images(path: Path):
    with np.load(path) as z:
        return [Image.fromarray(z[f"arr_{i}"]) for i in range(len(z.files))]


def prepare(s: DemoSettings, out: Path):
    """Base model, its samples on the evaluation prompts/seeds, and oracle-labelled candidate pairs. Cached in
    ``out/base`` (keyed by the settings that shape them), so more seeds or a second run skip the sampling."""
    comp = load_components(detect_kind(s.model), s.model)
    prompts = all_prompts()
    unknown = [p for p in s.held_out if p not in prompts]
    if unknown:
        raise ValueError(f"held-out prompts {unknown} are not prompts of the shapes world")
    train_prompts = [p for p in prompts if p not in s.held_out]
    eval_p = [p for p in prompts for _ in range(s.eval_seeds)]
    eval_seeds = [10_000 + j for _ in prompts for j in range(s.eval_seeds)]
    cache, key = out / "base", {k: getattr(s, k) for k in PREP_KEYS}
    if (cache / "prepare.json").exists() and json.loads((cache / "prepare.json").read_text())["settings"] == key:
        meta = json.loads((cache / "prepare.json").read_text())
        base_imgs = _load_images(cache / "base_images.npz")
        print(f"[1-2/4] base samples and {meta['pairs']} labelled pairs reused from {cache}", flush=True)
        n_pairs = meta["pairs"]
    else:
        pipe = comp.pipeline()
        print(f"[1/4] base model: sampling {len(prompts)} prompts x {s.eval_seeds} seeds", flush=True)
        base_imgs = sample(pipe, eval_p, eval_seeds, s)
        print(f"[2/4] labelling: {s.candidates} candidates x {len(train_prompts)} training prompts with the oracle",
              flush=True)
        cand_p = [p for p in train_prompts for _ in range(s.candidates)]
        cand_imgs = sample(pipe, cand_p, list(range(len(cand_p))), s)
        pairs = candidate_pairs(cand_imgs, cand_p, oracle(cand_imgs, cand_p), s.min_margin, np.random.default_rng(0))
        if len(pairs) < s.batch_size:
            raise RuntimeError(f"only {len(pairs)} preference pairs with margin >= {s.min_margin}; lower --min-margin")
        cache.mkdir(parents=True, exist_ok=True)
        write_pickapic_parquet(cache / "pairs.parquet", pairs)
        _save_images(cache / "base_images.npz", base_imgs)
        n_pairs = len(pairs)
        (cache / "prepare.json").write_text(json.dumps({"settings": key, "pairs": n_pairs}))
        print(f"      {n_pairs} pairs (Pick-a-Pic v2 schema) -> {cache / 'pairs.parquet'}", flush=True)
    return SimpleNamespace(comp=comp, prompts=prompts, train_prompts=train_prompts, eval_p=eval_p,
                           eval_seeds=eval_seeds, base_imgs=base_imgs, base_scores=oracle(base_imgs, eval_p),
                           base_ok=[is_correct(i, p) for i, p in zip(base_imgs, eval_p)], pairs=n_pairs,
                           pairs_file=str(cache / "pairs.parquet"))


def train_and_evaluate(s: DemoSettings, prep, cfg):
    """Train a fresh copy of the base model with ``cfg`` and score it on the evaluation prompts/seeds."""
    import copy

    comp = copy.deepcopy(prep.comp)
    t0 = time.time()
    result = run_diffusion(cfg, components=comp, scorer=oracle)
    train_s = time.time() - t0
    tuned_imgs = sample(comp.pipeline(result.recipe.unet), prep.eval_p, prep.eval_seeds, s)
    tuned_scores = oracle(tuned_imgs, prep.eval_p)
    tuned_ok = [is_correct(i, p) for i, p in zip(tuned_imgs, prep.eval_p)]
    table = summarize(prep.base_scores, tuned_scores, prep.base_ok, tuned_ok, prep.eval_p, s.held_out)
    return SimpleNamespace(result=result, table=table, tuned_imgs=tuned_imgs, train_seconds=train_s)
