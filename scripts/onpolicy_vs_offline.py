"""Reproduce the didactic result of "Preference Fine-Tuning of LLMs Should Leverage Suboptimal, On-Policy Data"
(Tajwar et al. 2024, arXiv 2404.14367, Sec. 4-5, the bandit experiments): when the reward's optimum sits where
the reference policy has little mass, on-policy sampling and a negative gradient (mode-seeking objectives) move
probability mass to the high-reward region faster than maximum likelihood on preferred responses or offline
contrastive training on the reference's own samples.

The problem: a categorical policy over V = 100 responses (softmax of 100 logits, starting at the reference's).
Reward r(y) = exp(-((y - 80) / 6)^2); the reference is a bump around y = 25 with 5% of its mass spread
uniformly, so y near 80 is rare under it. Same budget for every method: ``--steps`` steps of ``--batch``
samples (pairs for DPO; pairs whose rewards differ by less than ``--tie`` are ties and dropped), Adam. The
objectives are the core's losses (LOSSES["dpo"], LOSSES["reinforce"],
LOSSES["disco_b"]):

  SFT (offline)     maximum likelihood on the preferred response of reference-sampled pairs (filtered BC)
  DPO (offline)     DPO on a fixed set of reference-sampled pairs labelled by r
  DPO (online)      DPO on pairs sampled from the current policy, labelled by r
  RL (on-policy)    REINFORCE with the batch mean as baseline (negative gradient on below-average samples)
  DisCO-b (on-policy) the balanced discriminative objective on samples above / below reward 0.5

    python scripts/onpolicy_vs_offline.py [--seeds 0 1 2 --steps 300 --out runs/onpolicy]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from mmalign.losses import LOSSES
from mmalign.utils import print_table

V = 100
Y = torch.arange(V, dtype=torch.float64)
REWARD = torch.exp(-(((Y - 80) / 6) ** 2))
HIGH = REWARD > 0.5  # the high-reward region


def reference_logits() -> torch.Tensor:
    bump = torch.exp(-(((Y - 25) / 8) ** 2))
    p = 0.95 * bump / bump.sum() + 0.05 / V
    return torch.log(p)


def run(method: str, seed: int, steps: int, batch: int, lr: float, beta: float, tie: float = 0.01) -> dict:
    g = torch.Generator().manual_seed(seed)
    ref = reference_logits()
    theta = ref.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    offline = None
    if method in ("sft", "dpo_offline"):  # a fixed dataset from the reference: the same number of samples
        n = steps * batch
        a = torch.multinomial(ref.softmax(-1), n, replacement=True, generator=g)
        b = torch.multinomial(ref.softmax(-1), n, replacement=True, generator=g)
        offline = (a, b)
    curve = []
    for step in range(steps + 1):
        with torch.no_grad():
            p = theta.softmax(-1)
            curve.append({"step": step, "reward": float((p * REWARD).sum()), "high_mass": float(p[HIGH].sum())})
        if step == steps:
            break
        logp = theta.log_softmax(-1)
        ref_lp = ref.log_softmax(-1)
        if method in ("sft", "dpo_offline"):
            a, b = (x[step * batch: (step + 1) * batch] for x in offline)
        elif method in ("dpo_online",):
            pol = logp.detach().exp()
            a = torch.multinomial(pol, batch, replacement=True, generator=g)
            b = torch.multinomial(pol, batch, replacement=True, generator=g)
        else:
            y = torch.multinomial(logp.detach().exp(), batch, replacement=True, generator=g)
        if method in ("sft", "dpo_offline", "dpo_online"):
            keep = (REWARD[a] - REWARD[b]).abs() > tie  # a labeller calls near-equal rewards a tie: dropped
            a, b = a[keep], b[keep]
            w = torch.where(REWARD[a] > REWARD[b], a, b)
            lo = torch.where(REWARD[a] > REWARD[b], b, a)
            if method == "sft":
                loss = -logp[w].mean()
            else:
                loss = LOSSES["dpo"](logp[w], logp[lo], ref_lp[w], ref_lp[lo], beta=beta)[0].mean()
        elif method == "rl":
            r = REWARD[y]
            loss = LOSSES["reinforce"](logp[y], (r - r.mean()))[0].mean()
        elif method == "disco_b":
            groups = y.view(8, -1)  # 8 groups of batch/8 samples, binary reward
            loss = LOSSES["disco_b"](logp[groups], None, (REWARD[groups] > 0.5).double())[0].mean()
        else:
            raise ValueError(method)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"method": method, "seed": seed, "curve": curve}


NAMES = {"sft": "SFT on preferred (offline)", "dpo_offline": "DPO (offline pairs)",
         "dpo_online": "DPO (online pairs)", "rl": "RL, REINFORCE (on-policy)", "disco_b": "DisCO-b (on-policy)"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--tie", type=float, default=0.01, help="pairs whose rewards differ by less are ties (dropped)")
    ap.add_argument("--out", default="runs/onpolicy")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = [run(m, s, args.steps, args.batch, args.lr, args.beta, args.tie) for m in NAMES for s in args.seeds]
    marks = [args.steps // 10, args.steps // 3, args.steps]
    rows, table = [], []
    base = results[0]["curve"][0]
    for m, name in NAMES.items():
        rs = [r for r in results if r["method"] == m]
        at = {k: np.array([r["curve"][k]["reward"] for r in rs]) for k in marks}
        mass = np.array([r["curve"][-1]["high_mass"] for r in rs])
        first = [next((c["step"] for c in r["curve"] if c["reward"] >= 0.5), None) for r in rs]
        reached = [f for f in first if f is not None]
        table.append({"method": name, **{f"reward@{k}": (float(v.mean()), float(v.std(ddof=1))) for k, v in at.items()},
                      "high_mass_final": (float(mass.mean()), float(mass.std(ddof=1))),
                      "steps_to_reward_0.5": [f if f is not None else -1 for f in first]})
        rows.append([name] + [f"{at[k].mean():.3f} ± {at[k].std(ddof=1):.3f}" for k in marks]
                    + [f"{mass.mean():.3f} ± {mass.std(ddof=1):.3f}",
                       f"{np.mean(reached):.0f} ({len(reached)}/{len(rs)})" if reached else f"never (0/{len(rs)})"])
    print(f"reference: expected reward {base['reward']:.3f}, mass on the high-reward region {base['high_mass']:.3f}; "
          f"{len(args.seeds)} seeds, {args.steps} steps x {args.batch} samples, mean ± sd over seeds\n")
    print_table(["method"] + [f"E[r] at step {k}" for k in marks] + ["final mass, r > 0.5", "steps to E[r] >= 0.5"], rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for m, name in NAMES.items():
        rs = [r for r in results if r["method"] == m]
        steps = [c["step"] for c in rs[0]["curve"]]
        v = np.array([[c["reward"] for c in r["curve"]] for r in rs])
        ax.plot(steps, v.mean(0), label=name)
        ax.fill_between(steps, v.min(0), v.max(0), alpha=0.2)
    ax.set(xlabel="step", ylabel="expected reward E_pi[r]", title="on-policy vs offline (bandit, V=100), min-max over seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "reward_vs_step.png", dpi=110)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "table": table}, indent=1))
    print(f"\nplot: {out / 'reward_vs_step.png'}   table: {out / 'results.json'}   ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
