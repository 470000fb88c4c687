"""The shapes-world experiment behind ``online_vs_offline_diffusion.py`` and ``compare_online.py``: one ``diffusion``
recipe config per (model, method, seed) at an equal budget of sampled images, run through the online driver, read
back from its logs, summarised over seeds, printed, plotted.

Every arm trains on the learned reward ``toy_clip`` (80 % agreement with the oracle) with the world's oracle in the
held-out panel, and is evaluated on all 18 shapes prompts (4 held out of training) x the same seeds.

Methods (R rounds x K images per training prompt, S steps per round for the pair methods):
    offline      one round of R x K base-model images, the i-th best vs the i-th worst by toy_clip, R x S steps
    online_dpo   R rounds of K images from the current model, the same pairing, S steps per round
    grpo         R rounds; GRPO on the sampler's SDE / DDIM steps (window of 2), ``rl_steps`` steps per round
    nft          R rounds; DiffusionNFT on the final latents, ``rl_steps`` steps per round
    awm          R rounds; AWM on the final latents, ``rl_steps`` steps per round
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"sd": ROOT / "assets/models/shapes-sd", "sd3": ROOT / "assets/models/shapes-sd3"}
SPLITS = {"all": "", "held_out": "/held_out", "train": "/train_prompts"}
PAIRS = ("offline", "online_dpo")
# each method's loss at its authors' settings: GRPO clip 1e-4, KL 0.04 (flow_grpo SD3.5); NFT beta 1, KL 1e-4
# (DiffusionNFT); AWM KL 1e-3 to the base and 1.0 to its slow anchor (AWM's GenEval config: without the anchor it
# collapsed here too, toy_clip -0.13 in 28 steps)
LOSS = {"offline": {"name": "dpo"}, "online_dpo": {"name": "dpo"}, "grpo": {"name": "grpo"},
        "nft": {"name": "nft", "beta": 1.0, "kl_beta": 1e-4}, "awm": {"name": "awm", "kl_beta": 1e-3, "anchor_beta": 1.0}}


TRAIN_PROMPTS = ROOT / "assets/prompts/shapes_train.txt"  # the 14 shapes prompts not held out by the demo


def train_prompts(out: Path | None = None) -> Path:
    """The training prompts (the shipped file; tests/test_online.py checks it against the demo's held-out list)."""
    return TRAIN_PROMPTS


def config(model: str, method: str, out: Path, prompts: Path, seed: int, a) -> dict:
    """The recipe config of one arm (``a``: rounds, samples, steps, rl_steps, beta, lr, rl_lr, reward, eval_seeds,
    guard_patience, method-specific loss settings in ``a.loss``)."""
    from mmalign.diffusion.sampling import detect_kind

    rounds, samples, steps = (1, a.rounds * a.samples, a.rounds * a.steps) if method == "offline" else \
        (a.rounds, a.samples, a.steps if method in PAIRS else a.rl_steps)
    loss = {**LOSS[method], **({"beta": a.beta} if method in PAIRS else {}), **getattr(a, "loss", {}).get(method, {})}
    online = {"rounds": rounds, "steps_per_round": steps, "samples": samples, "prompts": str(prompts), "sample_steps": 20,
              "guidance": 3.0, "pairs": "halves", "reward": a.reward, "panel": "world:shapes", "eval_prompts": "shapes",
              "eval_seeds": a.eval_seeds, "prompts_per_batch": 14, "guard": a.guard_patience}
    if method == "grpo":
        online.update(sde_window=2)
    return {"recipe": "diffusion", "loss": loss, "online": online,
            "model": {"kind": detect_kind(str(MODELS[model])), "name_or_path": str(MODELS[model])},
            "data": {"resolution": 32},
            "train": {"output_dir": str(out), "batch_size": 16, "lr": a.lr if method in PAIRS else a.rl_lr,
                      "seed": seed, "log_every": 25, "report_to": ["jsonl"], "max_grad_norm": 1.0, "progress": False}}


def run_arm(cfg: dict) -> dict:
    """Train one arm; read the base (step 0) and final evaluations and the timings back from its logs."""
    from mmalign.config import config_from_dict
    from mmalign.train.diffusion import run
    from mmalign.train.sections import RECIPES

    out = Path(cfg["train"]["output_dir"])
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = run(config_from_dict(cfg, RECIPES))
    wall = time.perf_counter() - t0
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval/online/reward" in x]
    rounds = [json.loads(x) for x in (out / "online.jsonl").read_text().splitlines()]
    reward = f"eval/online/{cfg['online']['reward']}"
    row = {"images_sampled": rounds[-1]["images_sampled"], "steps": res.step,
           "train_seconds": wall - sum(r.get("eval_seconds", 0.0) for r in rounds),
           "guard_stop": next((r["step"] for r in rounds if r.get("guard", {}).get("stop")), None)}
    for name, key in (("oracle", "eval/online/world:shapes"), ("reward", reward)):
        for split, suffix in SPLITS.items():
            row[f"{name}_{split}"] = {"base": evals[0][key + suffix], "final": evals[-1][key + suffix]}
    row["curve"] = [{"step": e["step"], "images": r["images_sampled"], "oracle": e["eval/online/world:shapes"],
                     "reward": e[reward]} for e, r in zip(evals, rounds)]
    return row


def summarise(model: str, method: str, runs: list[dict], seeds: list[int]) -> dict:
    sd = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0  # noqa: E731
    out = {"model": f"shapes-{model}", "method": method, "seeds": seeds, "images_sampled": runs[0]["images_sampled"],
           "steps": runs[0]["steps"]}
    for k in runs[0]:
        if isinstance(runs[0][k], dict):
            fin = np.array([r[k]["final"] for r in runs])
            gain = fin - np.array([r[k]["base"] for r in runs])
            out[k] = {"base": round(runs[0][k]["base"], 4), "final": round(float(fin.mean()), 4),
                      "final_sd": round(sd(fin), 4), "gain": round(float(gain.mean()), 4), "gain_sd": round(sd(gain), 4)}
    t = np.array([r["train_seconds"] for r in runs])
    out["train_seconds"] = {"mean": round(float(t.mean()), 1), "sd": round(sd(t), 1)}
    out["per_seed_oracle_gain"] = [round(r["oracle_all"]["final"] - r["oracle_all"]["base"], 4) for r in runs]
    out["guard_stop"] = [r["guard_stop"] for r in runs]
    return out


def table(rows: list[dict]):
    from mmalign.utils import print_table

    pm = lambda d, k: f"{d[k]['gain']:+.4f} ± {d[k]['gain_sd']:.4f}"  # noqa: E731
    print_table(["model", "method", "images", "steps", "oracle gain (all)", "oracle gain (held-out)",
                 "oracle gain (train)", "toy_clip gain (all)", "train s"],
                [[r["model"], r["method"], r["images_sampled"], r["steps"], pm(r, "oracle_all"), pm(r, "oracle_held_out"),
                  pm(r, "oracle_train"), pm(r, "reward_all"), f"{r['train_seconds']['mean']:.0f}"] for r in rows])


def plot(curves: dict, path: Path, x: str = "step"):
    """One panel per model: the oracle (mean over seeds, band = min..max) against ``x`` (step or images)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({m for m, _ in curves})
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 3.8), squeeze=False)
    for ax, m in zip(axes[0], models):
        for i, method in enumerate(sorted({k for mm, k in curves if mm == m}, key=list(LOSS).index)):
            cs = curves[(m, method)]
            xs = [p[x] for p in cs[0]]
            v = np.array([[p["oracle"] for p in c] for c in cs])
            ax.plot(xs, v.mean(0), "o-", color=f"C{i}", label=f"{method} ({len(cs)} seeds)")
            if len(cs) > 1:
                ax.fill_between(xs, v.min(0), v.max(0), color=f"C{i}", alpha=0.15)
        ax.set(title=f"{m}: oracle, 18 prompts x eval seeds", xlabel="training step" if x == "step" else "images sampled",
               ylabel="oracle score")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(dirs: list[str], out: str) -> list[dict]:
    """One table and plots from several runs' ``summary.json`` (e.g. the group methods beside the
    pair methods of an earlier run with the same models, budget and evaluation seeds)."""
    rows, curves = [], {}
    for d in dirs:
        s = json.loads((Path(d) / "summary.json").read_text())
        rows += s["rows"]
        for key, v in s["curves"].items():
            curves[tuple(key.split("/", 1))] = v
    table(rows)
    Path(out).mkdir(parents=True, exist_ok=True)
    plot(curves, Path(out) / "oracle_vs_step.png", "step")
    plot(curves, Path(out) / "oracle_vs_images.png", "images")
    return rows


def experiment(a, methods: list[str]) -> list[dict]:
    """Every (model, method) over ``a.seeds``: one JSON line each (printed as it finishes), the table, the plots."""
    out = Path(a.out)
    prompts = train_prompts(out)
    rows, curves = [], {}
    for model in a.models.split(","):
        for method in methods:
            runs = []
            for seed in a.seeds:
                print(f"== shapes-{model} {method} seed {seed}", flush=True)
                runs.append(run_arm(config(model, method, out / f"{model}-{method}-seed{seed}", prompts, seed, a)))
                curves.setdefault((f"shapes-{model}", method), []).append(runs[-1]["curve"])
            rows.append(summarise(model, method, runs, a.seeds))
            print(json.dumps(rows[-1]), flush=True)
    print()
    table(rows)
    plot(curves, out / "oracle_vs_step.png", "step")
    plot(curves, out / "oracle_vs_images.png", "images")
    (out / "summary.json").write_text(json.dumps({"args": {k: v for k, v in vars(a).items()}, "rows": rows,
                                                   "curves": {f"{m}/{k}": v for (m, k), v in curves.items()}}, indent=1))
    print(f"\nplots: {out / 'oracle_vs_step.png'}, {out / 'oracle_vs_images.png'}   summary: {out / 'summary.json'}")
    return rows
