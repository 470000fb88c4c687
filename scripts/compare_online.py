"""Offline DPO, online DPO, GRPO, DiffusionNFT and AWM on the shapes world at an equal budget of sampled images
(issue #23), through the one ``diffusion`` recipe and online driver (``scripts/online_experiment.py``): toy_clip
trained, the oracle in the held-out panel, the shapes-sd UNet and the shapes-sd3 flow model, >= 3 seeds.

Every method samples R x K images per training prompt (offline: all at once from the base model). The pair
methods train S steps per round (DPO's beta and lr); the group methods ``--rl-steps`` steps per round at
``--rl-lr``. One JSON line per (model, method) with mean +- sd over seeds (oracle and toy_clip gains on all,
held-out and training prompts, images sampled, train seconds), a table, and two plots: the oracle against training
steps and against images sampled, one line per method with its spread over seeds.

    python scripts/compare_online.py                                  # both models, 3 seeds, all five methods
    python scripts/compare_online.py --models sd3 --methods grpo,nft,awm --seeds 0
    python scripts/compare_online.py --merge runs/a runs/b --out runs/ab   # one table and plots from several runs
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from online_experiment import LOSS, experiment, merge  # noqa: E402  (the shared experiment, beside this script)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd,sd3")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", default=",".join(LOSS))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--steps", type=int, default=75, help="steps per round of the pair methods")
    p.add_argument("--rl-steps", type=int, default=75, help="steps per round of GRPO / NFT / AWM")
    p.add_argument("--beta", type=float, default=2500.0)
    p.add_argument("--lr", type=float, default=2e-5, help="the pair methods' lr")
    p.add_argument("--rl-lr", type=float, default=2e-5, help="the group methods' lr")
    p.add_argument("--loss", default="{}", help='per-method loss settings as JSON, e.g. {"grpo": {"kl_beta": 0.01}}')
    p.add_argument("--reward", default="reward:toy_clip")
    p.add_argument("--eval-seeds", type=int, default=16)
    p.add_argument("--out", default="runs/compare_online")
    p.add_argument("--merge", nargs="+", default=None, metavar="DIR",
                   help="no training: one table and the plots (into --out) from these runs' summary.json")
    a = p.parse_args()
    if a.merge:
        merge(a.merge, a.out)
        return
    a.loss, a.guard_patience = json.loads(a.loss), 0
    experiment(a, a.methods.split(","))


if __name__ == "__main__":
    main()
