"""``mmalign demo`` arguments."""
from __future__ import annotations

import dataclasses


def add_parsers(sub):
    from .run import DemoSettings

    p = sub.add_parser("demo", help="Diffusion-DPO on the shipped shapes model: CPU, offline, a few minutes")
    d = DemoSettings()
    p.add_argument("--out", default=d.out, help="output folder (pairs, checkpoints, grid.png, reward_curve.png)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--candidates", type=int, default=d.candidates, help="samples per training prompt to label")
    p.add_argument("--eval-seeds", type=int, default=d.eval_seeds)
    p.add_argument("--beta", type=float, default=d.beta)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="0 = full UNet fine-tune")
    p.add_argument("--loss", default=d.loss, help="any pairwise loss of the core (mmalign losses)")
    p.add_argument("--min-margin", type=float, default=d.min_margin)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--model", default=d.model, help="base pipeline folder")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from .run import DemoSettings, run_demo

    fields = {f.name for f in dataclasses.fields(DemoSettings)}
    kw = {k: v for k, v in vars(args).items() if k in fields}
    run_demo(DemoSettings(**kw))
    return 0
