"""``mmalign demo``: Diffusion-DPO visibly aligning a text-to-image model, on CPU, offline.

1. load the shipped base model (assets/models/shapes-sd, pretrained on noisy captions, so it often
   draws the wrong colour or shape);
2. sample candidates for the training prompts and label pairs with the programmatic oracle
   (``mmalign.demo.world.oracle_score``) -- written as a Pick-a-Pic v2 parquet file;
3. train with the standard ``diffusion`` recipe (the same code path as SDXL), validating on fixed
   prompts/seeds with the oracle as reward;
4. compare base and tuned models on the same prompts and seeds, including prompts held out of
   training: oracle score, prompt accuracy and win rate; save a grid and a reward-curve plot.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from mmalign.paths import ASSETS

from .world import all_prompts, is_correct, oracle_score

DEMO_MODEL = ASSETS / "models" / "shapes-sd"
HELD_OUT = ["a green triangle", "a purple circle", "an orange square", "a blue triangle"]


@dataclass
class DemoSettings:
    out: str = "runs/demo"
    model: str = str(DEMO_MODEL)
    steps: int = 300
    candidates: int = 32
    """samples per training prompt to label"""
    min_margin: float = 0.25
    """keep pairs whose oracle scores differ by at least this"""
    eval_seeds: int = 8
    beta: float = 2500.0
    lr: float = 2e-5
    batch_size: int = 16
    lora_rank: int = 0
    """0 = full UNet fine-tune (frozen reference copy); > 0 = LoRA with the adapters-off reference"""
    loss: str = "dpo"
    guidance: float = 3.0
    sample_steps: int = 20
    seed: int = 0
    held_out: list[str] = field(default_factory=lambda: list(HELD_OUT))


def oracle(images, prompts) -> list[float]:
    return [oracle_score(i, p) for i, p in zip(images, prompts)]


@torch.no_grad()
def sample(pipe, prompts: list[str], seeds: list[int], settings: DemoSettings, batch: int = 256):
    out = []
    for lo in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(s) for s in seeds[lo: lo + batch]]
        out += pipe(prompts[lo: lo + batch], num_inference_steps=settings.sample_steps,
                    guidance_scale=settings.guidance, height=32, width=32, generator=gens).images
    return out


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


def summarize(base_scores, tuned_scores, base_ok, tuned_ok, prompts, held_out) -> list[dict]:
    rows = []
    for name, sel in (("held-out prompts", [p in held_out for p in prompts]),
                      ("training prompts", [p not in held_out for p in prompts]),
                      ("all prompts", [True] * len(prompts))):
        m = np.array(sel)
        b, t = np.array(base_scores)[m], np.array(tuned_scores)[m]
        win = float(np.mean((t > b) + 0.5 * (t == b)))
        rows.append({"split": name, "n": int(m.sum()), "base_score": float(b.mean()), "tuned_score": float(t.mean()),
                     "base_accuracy": float(np.array(base_ok)[m].mean()),
                     "tuned_accuracy": float(np.array(tuned_ok)[m].mean()), "win_rate": win})
    return rows


def plot_curves(history: list[dict], eval_history: list[dict], path: Path, base_reward: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ev = [r for r in eval_history if "eval/reward" in r]
    ax[0].plot([r["step"] for r in ev], [r["eval/reward"] for r in ev], "o-", label="tuned (validation)")
    ax[0].axhline(base_reward, color="gray", ls="--", label="base model")
    ax[0].set(xlabel="step", ylabel="oracle score", title="reward on validation prompts/seeds")
    ax[0].legend()
    tr = [r for r in history if "train/reward_accuracy" in r]
    ax[1].plot([r["step"] for r in tr], [r["train/reward_accuracy"] for r in tr], label="implicit accuracy")
    ax[1].plot([r["step"] for r in tr], [r["train/loss"] for r in tr], label="DPO loss")
    ax[1].axhline(np.log(2), color="gray", ls=":", lw=1)
    ax[1].set(xlabel="step", title="training")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def grid_image(base, tuned, prompts, seeds_per_prompt: int, path: Path, show: list[str]):
    from PIL import Image, ImageDraw

    cell, pad, label_w = 48, 2, 150
    rows = [(p, kind) for p in show for kind in ("base", "tuned")]
    W = label_w + seeds_per_prompt * (cell + pad)
    H = len(rows) * (cell + pad) + 16
    g = Image.new("RGB", (W, H), (255, 255, 255))
    d = ImageDraw.Draw(g)
    d.text((label_w, 2), "same seed per column", fill=(0, 0, 0))
    for r, (p, kind) in enumerate(rows):
        imgs = base if kind == "base" else tuned
        idx = [i for i, q in enumerate(prompts) if q == p][:seeds_per_prompt]
        y = 16 + r * (cell + pad)
        d.text((4, y + cell // 2 - 6), f"{p} [{kind}]{' *' if p in HELD_OUT else ''}", fill=(0, 0, 0))
        for c, i in enumerate(idx):
            im = imgs[i].resize((cell, cell), Image.NEAREST)
            g.paste(im, (label_w + c * (cell + pad), y))
            ok = is_correct(imgs[i], p)
            d.rectangle([label_w + c * (cell + pad), y, label_w + c * (cell + pad) + cell - 1, y + cell - 1],
                        outline=(40, 180, 40) if ok else (220, 40, 40))
    g.save(path)


def demo_config(s: DemoSettings, pairs_file: str, out: str, val_prompts: list[str], extra: dict | None = None):
    """The ``diffusion`` recipe config the demo trains with; ``extra`` deep-merges method options."""
    from mmalign.config import config_from_dict, deep_merge
    from mmalign.train.configs import RECIPES

    base = {
        "recipe": "diffusion",
        "model": {"kind": "sd", "name_or_path": s.model,
                  **({"lora": {"r": s.lora_rank, "alpha": s.lora_rank}} if s.lora_rank else {})},
        "data": {"train": pairs_file, "resolution": 32, "random_flip": True},
        "loss": {"name": s.loss, "beta": s.beta},
        "train": {"output_dir": out, "max_steps": s.steps, "batch_size": s.batch_size, "lr": s.lr,
                  "eval_every": max(1, s.steps // 6), "log_every": max(1, s.steps // 30), "seed": s.seed,
                  "report_to": ["jsonl"], "max_grad_norm": 1.0},
        "validation": {"prompts": val_prompts, "images_per_prompt": 6, "num_inference_steps": s.sample_steps,
                       "guidance_scale": s.guidance, "seed": 50_000},
    }
    return config_from_dict(deep_merge(base, extra or {}), RECIPES)


def prepare(s: DemoSettings, out: Path):
    """Base model, its samples on the evaluation prompts/seeds, and oracle-labelled candidate pairs."""
    from mmalign.diffusion.data import write_pickapic_parquet
    from mmalign.diffusion.models import load_components

    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    comp = load_components("sd", s.model)
    pipe = comp.pipeline()
    prompts = all_prompts()
    unknown = [p for p in s.held_out if p not in prompts]
    if unknown:
        raise ValueError(f"held-out prompts {unknown} are not prompts of the shapes world")
    train_prompts = [p for p in prompts if p not in s.held_out]
    print(f"[1/4] base model: sampling {len(prompts)} prompts x {s.eval_seeds} seeds", flush=True)
    eval_p = [p for p in prompts for _ in range(s.eval_seeds)]
    eval_seeds = [10_000 + j for _ in prompts for j in range(s.eval_seeds)]
    base_imgs = sample(pipe, eval_p, eval_seeds, s)
    print(f"[2/4] labelling: {s.candidates} candidates x {len(train_prompts)} training prompts with the oracle",
          flush=True)
    cand_p = [p for p in train_prompts for _ in range(s.candidates)]
    cand_imgs = sample(pipe, cand_p, list(range(len(cand_p))), s)
    pairs = label_pairs(cand_imgs, cand_p, oracle(cand_imgs, cand_p), s.min_margin, rng)
    if len(pairs) < s.batch_size:
        raise RuntimeError(f"only {len(pairs)} preference pairs with margin >= {s.min_margin}; lower --min-margin")
    write_pickapic_parquet(out / "pairs.parquet", pairs)
    print(f"      {len(pairs)} pairs (Pick-a-Pic v2 schema) -> {out / 'pairs.parquet'}", flush=True)
    return SimpleNamespace(comp=comp, prompts=prompts, train_prompts=train_prompts, eval_p=eval_p,
                           eval_seeds=eval_seeds, base_imgs=base_imgs, base_scores=oracle(base_imgs, eval_p),
                           base_ok=[is_correct(i, p) for i, p in zip(base_imgs, eval_p)], pairs=len(pairs))


def train_and_evaluate(s: DemoSettings, prep, cfg):
    """Train a fresh copy of the base model with ``cfg`` and score it on the evaluation prompts/seeds."""
    import copy

    from mmalign.train.diffusion import run

    comp = copy.deepcopy(prep.comp)
    t0 = time.time()
    result = run(cfg, components=comp, scorer=oracle)
    train_s = time.time() - t0
    tuned_imgs = sample(comp.pipeline(result.recipe.unet), prep.eval_p, prep.eval_seeds, s)
    tuned_scores = oracle(tuned_imgs, prep.eval_p)
    tuned_ok = [is_correct(i, p) for i, p in zip(tuned_imgs, prep.eval_p)]
    table = summarize(prep.base_scores, tuned_scores, prep.base_ok, tuned_ok, prep.eval_p, s.held_out)
    return SimpleNamespace(result=result, table=table, tuned_imgs=tuned_imgs, train_seconds=train_s)


def run_demo(s: DemoSettings) -> dict:
    from mmalign.utils import print_table

    t0 = time.time()
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    prep = prepare(s, out)
    print(f"[3/4] Diffusion-DPO: {s.steps} steps, beta {s.beta:g}, "
          f"{'LoRA r=%d' % s.lora_rank if s.lora_rank else 'full UNet'}", flush=True)
    val_prompts = s.held_out[:3] + prep.train_prompts[:3]
    cfg = demo_config(s, str(out / "pairs.parquet"), str(out / "train"), val_prompts)
    print("[4/4] training, then the tuned model on the same prompts and seeds", flush=True)
    te = train_and_evaluate(s, prep, cfg)
    result, table = te.result, te.table
    show = s.held_out[:3] + prep.train_prompts[:3]
    grid_image(prep.base_imgs, te.tuned_imgs, prep.eval_p, s.eval_seeds, out / "grid.png", show)
    base_val = [r for r in result.eval_history if r["step"] == 0 and "eval/reward" in r]
    plot_curves(result.history, result.eval_history, out / "reward_curve.png",
                base_val[0]["eval/reward"] if base_val else float("nan"))
    wall = time.time() - t0
    report = {"settings": asdict(s), "pairs": prep.pairs, "table": table, "wall_seconds": wall,
              "train_seconds": te.train_seconds, "train_history": result.history,
              "eval_history": result.eval_history}
    (out / "report.json").write_text(json.dumps(report, indent=1))

    print()
    print_table(["prompts", "n", "oracle base", "oracle tuned", "accuracy base", "accuracy tuned", "win rate vs base"],
                [[r["split"], r["n"], f"{r['base_score']:.3f}", f"{r['tuned_score']:.3f}",
                  f"{r['base_accuracy']:.3f}", f"{r['tuned_accuracy']:.3f}", f"{r['win_rate']:.3f}"] for r in table])
    print(f"\nheld out of training: {', '.join(s.held_out)}")
    print(f"grid: {out / 'grid.png'}   reward curve: {out / 'reward_curve.png'}   report: {out / 'report.json'}")
    print(f"total {wall:.0f}s")
    return report
