"""``mmalign`` command line (also ``python -m mmalign``).

    mmalign train CONFIG [key=value ...]     train any recipe from a YAML config
    mmalign losses                           table of the loss core
    mmalign demo [...]                       the embedded Diffusion-DPO demo (CPU, offline)
    mmalign score --reward NAME --images ... score images with bundled reward models
    mmalign label ...                        turn a reward into pairwise preference labels
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys


def _cmd_train(args) -> int:
    from mmalign.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    module, fn = type(cfg).runner.split(":")
    run = getattr(importlib.import_module(module), fn)
    try:
        run(cfg)
    except KeyboardInterrupt:
        return 130
    return 0


def _cmd_losses(args) -> int:
    from mmalign.losses import loss_table
    from mmalign.utils import print_table

    print_table(["name", "kind", "objective"], [list(r) for r in loss_table()])
    return 0


def _lazy(module: str, fn: str):
    def call(args):
        return getattr(importlib.import_module(module), fn)(args)

    return call


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmalign", description="Preference alignment for multimodal generative models")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe from a YAML config")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.lr=1e-4 loss.beta=0.2")
    t.set_defaults(func=_cmd_train)

    ls = sub.add_parser("losses", help="list the registered losses")
    ls.set_defaults(func=_cmd_losses)

    for mod in ("mmalign.demo.cli", "mmalign.rewards.cli", "mmalign.data.cli", "mmalign.vl.cli"):
        try:
            importlib.import_module(mod).add_parsers(sub)
        except ModuleNotFoundError as e:  # a family not built yet; a missing *dependency* still raises
            if not (e.name and mod.startswith(e.name)):
                raise
    return p


def main(argv: list[str] | None = None) -> int:
    from mmalign.config import ConfigError
    from mmalign.data.records import DataError

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (DataError, ConfigError) as e:  # bad input: one clear line, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
