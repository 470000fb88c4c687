"""``mmalign demo``: Diffusion-DPO on the shipped shapes model, base vs tuned over several seeds."""
from __future__ import annotations

import dataclasses

from mmalign.demo.settings import DemoSettings

# Library imports are inside run(): building the parser (mmalign --help) must not load torch (~4 s).


def add_arguments(p):
    d = DemoSettings()
    p.add_argument("--out", default=d.out, help="output folder (pairs, checkpoints, grid.png, reward_curve.png)")
    p.add_argument("--seeds", type=int, nargs="+", default=d.seeds,
                   help="training seeds; the table reports mean and spread over them")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--candidates", type=int, default=d.candidates, help="samples per training prompt to label")
    p.add_argument("--eval-seeds", type=int, default=d.eval_seeds, help="images per prompt in the evaluation")
    p.add_argument("--beta", type=float, default=d.beta)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="0 = full UNet / transformer fine-tune")
    p.add_argument("--loss", default=d.loss, help="any pairwise loss of the core (mmalign losses)")
    p.add_argument("--min-margin", type=float, default=d.min_margin)
    p.add_argument("--model", default=d.model, help="base pipeline folder (any family: shapes-sd, or shapes-sd3 for flow matching)")


def run(args) -> int:
    from mmalign.demo.run import run_demo

    fields = {f.name for f in dataclasses.fields(DemoSettings)}
    run_demo(DemoSettings(**{k: v for k, v in vars(args).items() if k in fields}))
    return 0
