"""``mmalign demo``: Diffusion-DPO visibly aligning a text-to-image model, on CPU, offline.

1. load the shipped base model (assets/models/shapes-sd, pretrained on noisy captions, so it often
   draws the wrong colour or shape);
2. sample candidates for the training prompts and label pairs with the shapes world's oracle -- written
   as a Pick-a-Pic v2 parquet file (cached in ``<out>/base`` and reused by later runs with the same settings);
3. for every training seed, train with the standard ``diffusion`` recipe (the same code path as SDXL),
   validating on fixed prompts/seeds with the oracle as reward;
4. compare base and tuned models on the same prompts and seeds, including prompts held out of training:
   oracle score, prompt accuracy and win rate per seed, then the mean and spread over seeds; save a grid
   (first seed) and the reward curves (every seed).

Why several seeds: the tuned model depends on the training seed (data order, noise) and on the floating-
point rounding of the machine (CPU microarchitecture and thread count change kernel results, and 300
steps of DPO amplify that), so one run is one draw; the table reports mean, spread and the worst seed.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

from mmalign.config import config_from_dict, deep_merge
from mmalign.diffusion.data import write_pickapic_parquet
from mmalign.diffusion.models import load_components
from mmalign.diffusion.sampling import detect_kind, sample_images
from mmalign.eval.stats import wins
from mmalign.toyworld.world import all_prompts, is_correct, oracle_score
from mmalign.train.diffusion import run as run_diffusion
from mmalign.train.sections import RECIPES
from mmalign.utils import print_table

from .settings import HELD_OUT, DemoSettings


def oracle(images, prompts) -> list[float]:
    return [oracle_score(i, p) for i, p in zip(images, prompts)]


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], settings: DemoSettings) -> list:
    """The demo's 32 px images with its sampler settings (``mmalign.diffusion.sampling.sample_images``)."""
    return sample_images(pipe, prompts, seeds, settings.sample_steps, settings.guidance, 32, batch_size=256)


def label_pairs(images, prompts, scores, min_margin: float, rng: np.random.Generator) -> list[dict]:
    """Per prompt: sort candidates by oracle score and pair the i-th best with the i-th worst when
    their scores differ by ``min_margin``; label_0 is randomised so the winner is not always image 0."""
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(i)
    rows = []
    for p, idx in by_prompt.items():
        idx = sorted(idx, key=lambda i: -scores[i])
        half = len(idx) // 2
        for a, b in zip(idx[:half], reversed(idx[half:])):
            if scores[a] - scores[b] < min_margin:
                continue
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


def plot_curves(runs: list[tuple[int, list[dict], list[dict]]], path: Path, base_reward: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    for seed, history, eval_history in runs:
        ev = [r for r in eval_history if "eval/reward" in r]
        ax[0].plot([r["step"] for r in ev], [r["eval/reward"] for r in ev], "o-", label=f"tuned, seed {seed}")
        tr = [r for r in history if "train/reward_accuracy" in r]
        ax[1].plot([r["step"] for r in tr], [r["train/reward_accuracy"] for r in tr], label=f"implicit acc, seed {seed}")
        ax[1].plot([r["step"] for r in tr], [r["train/loss"] for r in tr], ls="--", label=f"DPO loss, seed {seed}")
    ax[0].axhline(base_reward, color="gray", ls="--", label="base model")
    ax[0].set(xlabel="step", ylabel="oracle score", title="reward on validation prompts/seeds")
    ax[0].legend(fontsize=7)
    ax[1].axhline(np.log(2), color="gray", ls=":", lw=1)
    ax[1].set(xlabel="step", title="training")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grid_image(base, tuned, prompts, seeds_per_prompt: int, path: Path, show: list[str]):
    from PIL import ImageDraw

    cell, pad, label_w = 48, 2, 150
    seeds_per_prompt = min(seeds_per_prompt, 8)
    rows = [(p, kind) for p in show for kind in ("base", "tuned")]
    g = Image.new("RGB", (label_w + seeds_per_prompt * (cell + pad), len(rows) * (cell + pad) + 16), (255, 255, 255))
    d = ImageDraw.Draw(g)
    d.text((label_w, 2), "same seed per column", fill=(0, 0, 0))
    for r, (p, kind) in enumerate(rows):
        imgs = base if kind == "base" else tuned
        idx = [i for i, q in enumerate(prompts) if q == p][:seeds_per_prompt]
        y = 16 + r * (cell + pad)
        d.text((4, y + cell // 2 - 6), f"{p} [{kind}]{' *' if p in HELD_OUT else ''}", fill=(0, 0, 0))
        for c, i in enumerate(idx):
            g.paste(imgs[i].resize((cell, cell), Image.NEAREST), (label_w + c * (cell + pad), y))
            d.rectangle([label_w + c * (cell + pad), y, label_w + c * (cell + pad) + cell - 1, y + cell - 1],
                        outline=(40, 180, 40) if is_correct(imgs[i], p) else (220, 40, 40))
    g.save(path)


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
        pairs = label_pairs(cand_imgs, cand_p, oracle(cand_imgs, cand_p), s.min_margin, np.random.default_rng(0))
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


def _pm(r: dict, k: str) -> str:
    return f"{r[k]:.3f} ± {r[k + '_sd']:.3f}"


def run_demo(s: DemoSettings) -> dict:
    t0 = time.time()
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare(s, out)
    val_prompts = s.held_out[:3] + prep.train_prompts[:3]
    runs, per_seed = [], []
    for i, seed in enumerate(s.seeds):
        si = dataclasses.replace(s, seed=seed)
        print(f"[3/4] Diffusion-DPO, seed {seed} ({i + 1}/{len(s.seeds)}): {s.steps} steps, beta {s.beta:g}, "
              f"{'LoRA r=%d' % s.lora_rank if s.lora_rank else 'full denoiser'}", flush=True)
        cfg = demo_config(si, prep.pairs_file, str(out / f"train-seed{seed}"), val_prompts)
        te = train_and_evaluate(si, prep, cfg)
        runs.append((seed, te.result.history, te.result.eval_history))
        per_seed.append({"seed": seed, "table": te.table, "train_seconds": te.train_seconds})
        if i == 0:
            grid_image(prep.base_imgs, te.tuned_imgs, prep.eval_p, s.eval_seeds, out / "grid.png",
                       s.held_out[:3] + prep.train_prompts[:3])
        t = {r["split"]: r for r in te.table}
        print(f"[4/4] seed {seed}: all prompts oracle {t['all prompts']['base_score']:.3f} -> "
              f"{t['all prompts']['tuned_score']:.3f}, win rate {t['all prompts']['win_rate']:.3f}; held-out win rate "
              f"{t['held-out prompts']['win_rate']:.3f}", flush=True)
    summary = across_seeds([r["table"] for r in per_seed])
    base_val = [r for r in runs[0][2] if r["step"] == 0 and "eval/reward" in r]
    plot_curves(runs, out / "reward_curve.png", base_val[0]["eval/reward"] if base_val else float("nan"))
    wall = time.time() - t0
    report = {"settings": asdict(s), "pairs": prep.pairs, "summary": summary, "per_seed": per_seed,
              "wall_seconds": wall, "train_histories": {str(sd): h for sd, h, _ in runs},
              "eval_histories": {str(sd): e for sd, _, e in runs}}
    (out / "report.json").write_text(json.dumps(report, indent=1))

    print(f"\nbase vs tuned over {len(s.seeds)} training seed(s) {s.seeds} (tuned: mean ± sd over seeds):")
    print_table(["prompts", "n", "oracle base", "oracle tuned", "accuracy base", "accuracy tuned",
                 "win rate vs base", "worst seed win rate"],
                [[r["split"], r["n"], f"{r['base_score']:.3f}", _pm(r, "tuned_score"), f"{r['base_accuracy']:.3f}",
                  _pm(r, "tuned_accuracy"), _pm(r, "win_rate"), f"{r['win_rate_min']:.3f}"] for r in summary])
    print_table(["seed", "held-out win rate", "all-prompts win rate", "oracle tuned (all)", "accuracy tuned (all)",
                 "train s"],
                [[p["seed"]] + [f"{x:.3f}" for x in (p["table"][0]["win_rate"], p["table"][2]["win_rate"],
                                                    p["table"][2]["tuned_score"], p["table"][2]["tuned_accuracy"])]
                 + [f"{p['train_seconds']:.0f}"] for p in per_seed])
    print(f"\nheld out of training: {', '.join(s.held_out)}")
    print(f"grid: {out / 'grid.png'}   reward curves: {out / 'reward_curve.png'}   report: {out / 'report.json'}")
    print(f"total {wall:.0f}s")
    return report
