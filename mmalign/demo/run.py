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

import numpy as np
from PIL import Image

from mmalign.toyworld.world import is_correct
from mmalign.utils import print_table

from .experiment import across_seeds, demo_config, prepare, train_and_evaluate
from .settings import HELD_OUT, DemoSettings


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
