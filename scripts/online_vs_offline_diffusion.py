"""Online vs offline Diffusion-DPO at equal budget, on the shapes world (issue #22).

Both arms run the same ``diffusion`` recipe and online driver on a shipped shapes model, trained on the
learned reward ``toy_clip`` (80 % agreement with the oracle) with the world's oracle in the held-out panel:

* offline: one round of R x K base-model samples per training prompt, pairs labelled by toy_clip (the i-th best
  vs the i-th worst, the demo's rule), R x S training steps -- the demo's recipe with a learned labeller;
* online:  R rounds of K samples per prompt from the *current* model, the same pairing, S steps per round.

Same images sampled, same steps, batch, beta, lr and evaluation prompts/seeds (all 18 prompts x 16 seeds; 4
held out of training). One JSON line per (model, method): mean +- sd over seeds of the oracle and of toy_clip
(all, held-out and training prompts: base, final, gain), images sampled and train seconds (wall time without the
evaluations). ``--guard`` instead pushes a run to over-optimise and shows whether the guard stops it.

    python scripts/online_vs_offline_diffusion.py                       # shapes-sd and shapes-sd3, 3 seeds
    python scripts/online_vs_offline_diffusion.py --models sd --seeds 0 --rounds 2 --steps 20   # a quick look
    python scripts/online_vs_offline_diffusion.py --guard --models sd   # the guard at work
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {"sd": ROOT / "assets/models/shapes-sd", "sd3": ROOT / "assets/models/shapes-sd3"}
SPLITS = {"all": "", "held_out": "/held_out", "train": "/train_prompts"}


def config(model: str, out: Path, prompts: Path, seed: int, rounds: int, samples: int, steps: int, a) -> dict:
    """The diffusion recipe config of one arm (``rounds=1`` with R x K samples and R x S steps: offline)."""
    from mmalign.diffusion.sampling import detect_kind

    return {
        "recipe": "diffusion",
        "model": {"kind": detect_kind(str(MODELS[model])), "name_or_path": str(MODELS[model])},
        "data": {"resolution": 32},
        "loss": {"name": "dpo", "beta": a.beta},
        "online": {"rounds": rounds, "steps_per_round": steps, "samples": samples, "prompts": str(prompts),
                   "sample_steps": 20, "guidance": 3.0, "pairs": "halves", "reward": a.reward, "panel": "world:shapes",
                   "eval_prompts": "shapes", "eval_seeds": a.eval_seeds, "prompts_per_batch": 14, "guard": a.guard_patience},
        "train": {"output_dir": str(out), "batch_size": 16, "lr": a.lr, "seed": seed, "log_every": 25,
                  "report_to": ["jsonl"], "max_grad_norm": 1.0, "progress": False},
    }


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
    row["curve"] = [{"step": e["step"], "oracle": e["eval/online/world:shapes"], "reward": e[reward]} for e in evals]
    return row


def summarise(model: str, method: str, runs: list[dict], a) -> dict:
    out = {"model": model, "method": method, "seeds": a.seeds, "images_sampled": runs[0]["images_sampled"],
           "steps": runs[0]["steps"]}
    for k in runs[0]:
        if isinstance(runs[0][k], dict):
            fin = np.array([r[k]["final"] for r in runs])
            gain = fin - np.array([r[k]["base"] for r in runs])
            out[k] = {"base": round(runs[0][k]["base"], 4), "final": round(float(fin.mean()), 4),
                      "final_sd": round(float(fin.std(ddof=1)) if len(fin) > 1 else 0.0, 4),
                      "gain": round(float(gain.mean()), 4), "gain_sd": round(float(gain.std(ddof=1)) if len(gain) > 1 else 0.0, 4)}
    t = np.array([r["train_seconds"] for r in runs])
    out["train_seconds"] = {"mean": round(float(t.mean()), 1), "sd": round(float(t.std(ddof=1)) if len(t) > 1 else 0.0, 1)}
    out["per_seed_oracle_gain"] = [round(r["oracle_all"]["final"] - r["oracle_all"]["base"], 4) for r in runs]
    return out


def table(rows: list[dict]):
    from mmalign.utils import print_table

    pm = lambda d, k: f"{d[k]['gain']:+.4f} ± {d[k]['gain_sd']:.4f}"  # noqa: E731
    print_table(["model", "method", "images", "steps", "oracle gain (all)", "oracle gain (held-out)",
                 "oracle gain (train)", "toy_clip gain (all)", "train s"],
                [[r["model"], r["method"], r["images_sampled"], r["steps"], pm(r, "oracle_all"), pm(r, "oracle_held_out"),
                  pm(r, "oracle_train"), pm(r, "reward_all"), f"{r['train_seconds']['mean']:.0f}"] for r in rows])


def plot(rows: list[dict], curves: dict, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, m in zip(axes[0], models):
        for method, color in (("offline", "C0"), ("online", "C1")):
            cs = curves.get((m, method), [])
            if not cs:
                continue
            steps = [p["step"] for p in cs[0]]
            v = np.array([[p["oracle"] for p in c] for c in cs])
            ax.plot(steps, v.mean(0), "o-", color=color, label=f"{method} (mean of {len(cs)} seeds)")
            if len(cs) > 1:
                ax.fill_between(steps, v.min(0), v.max(0), color=color, alpha=0.2)
        ax.set(title=f"{m}: oracle, 18 prompts x the eval seeds", xlabel="training step", ylabel="oracle score")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd,sd3")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rounds", type=int, default=4, help="R: online rounds (offline samples R x K at once)")
    p.add_argument("--samples", type=int, default=8, help="K: images per prompt per round")
    p.add_argument("--steps", type=int, default=75, help="S: training steps per round")
    p.add_argument("--beta", type=float, default=2500.0)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--reward", default="reward:toy_clip", help="the trained reward")
    p.add_argument("--eval-seeds", type=int, default=16)
    p.add_argument("--methods", default="offline,online")
    p.add_argument("--guard", action="store_true", help="push an online run to over-optimise (8 rounds, lr x5, "
                   "guard on); with --reward reward:brightness for a reward that can be hacked")
    p.add_argument("--out", default="runs/online_vs_offline")
    a = p.parse_args()
    a.guard_patience = 2 if a.guard else 0
    if a.guard:
        a.rounds, a.lr, a.methods = max(a.rounds, 8), a.lr * 5, "online"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    from mmalign.demo.settings import HELD_OUT
    from mmalign.toyworld.world import all_prompts

    prompts = out / "train_prompts.txt"
    prompts.write_text("\n".join(x for x in all_prompts() if x not in HELD_OUT) + "\n")
    rows, curves = [], {}
    for model in a.models.split(","):
        for method in a.methods.split(","):
            runs = []
            for seed in a.seeds:
                r, k, s = (1, a.rounds * a.samples, a.rounds * a.steps) if method == "offline" else \
                    (a.rounds, a.samples, a.steps)
                print(f"== shapes-{model} {method} seed {seed}: {r} round(s) x {k} images per prompt, {s} steps each",
                      flush=True)
                runs.append(run_arm(config(model, out / f"{model}-{method}-seed{seed}", prompts, seed, r, k, s, a)))
                curves.setdefault((f"shapes-{model}", method), []).append(runs[-1]["curve"])
            rows.append(summarise(f"shapes-{model}", method, runs, a))
            print(json.dumps(rows[-1]), flush=True)
    print()
    table(rows)
    plot(rows, curves, out / "online_vs_offline.png")
    (out / "summary.json").write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    print(f"\nplot: {out / 'online_vs_offline.png'}   summary: {out / 'summary.json'}")


if __name__ == "__main__":
    main()
