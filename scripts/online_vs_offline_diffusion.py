"""Online vs offline Diffusion-DPO at equal budget, on the shapes world (issue #22).

Both arms run the same ``diffusion`` recipe and online driver on a shipped shapes model, trained on the
learned reward ``toy_clip`` (80 % agreement with the oracle) with the world's oracle in the held-out panel
(``scripts/online_experiment.py``):

* offline:    one round of R x K base-model samples per training prompt, pairs labelled by toy_clip (the i-th best
              vs the i-th worst, the demo's rule), R x S training steps -- the demo's recipe with a learned labeller;
* online_dpo: R rounds of K samples per prompt from the *current* model, the same pairing, S steps per round.

Same images sampled, same steps, batch, beta, lr and evaluation prompts/seeds (all 18 prompts x 16 seeds; 4
held out of training). One JSON line per (model, method): mean +- sd over seeds of the oracle and of toy_clip
(all, held-out and training prompts: base, final, gain), images sampled and train seconds (wall time without the
evaluations). ``--guard`` instead pushes an online run to over-optimise and shows whether the guard stops it.

    python scripts/online_vs_offline_diffusion.py                       # shapes-sd and shapes-sd3, 3 seeds
    python scripts/online_vs_offline_diffusion.py --models sd --seeds 0 --rounds 2 --steps 20   # a quick look
    python scripts/online_vs_offline_diffusion.py --guard --models sd   # the guard at work
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from online_experiment import experiment  # noqa: E402  (the shared experiment, beside this script)


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
    p.add_argument("--methods", default="offline,online_dpo")
    p.add_argument("--guard", action="store_true", help="push an online run to over-optimise (8 rounds, lr x5, "
                   "guard on); with --reward reward:brightness for a reward that can be hacked")
    p.add_argument("--out", default="runs/online_vs_offline")
    a = p.parse_args()
    a.guard_patience, a.rl_steps, a.rl_lr = (2 if a.guard else 0), a.steps, a.lr
    if a.guard:
        a.rounds, a.lr, a.methods = max(a.rounds, 8), a.lr * 5, "online_dpo"
    experiment(a, a.methods.split(","))


if __name__ == "__main__":
    main()
