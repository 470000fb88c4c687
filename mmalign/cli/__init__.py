"""``mmalign`` command line (also ``python -m mmalign``): one table of commands.

Each command lives in its own module of this package, with ``add_arguments(parser)`` and ``run(args)``;
the wings (rewards, data, diffusion, vl, demo) expose library functions only. A command module is imported
only to build the parser, and heavy libraries load when a command runs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NamedTuple

from mmalign.config import ConfigError
from mmalign.data.records import DataError


class Command(NamedTuple):
    name: str
    help: str
    module: str


COMMANDS = (
    Command("train", "train a recipe from a YAML config (key=value overrides)", "mmalign.cli.train"),
    Command("losses", "table of the loss core (name, kind, paper equation)", "mmalign.cli.losses"),
    Command("sample", "generate images with a diffusers pipeline (+ LoRA) for prompts x seeds", "mmalign.cli.sample"),
    Command("eval", "base vs tuned: several rewards, mean with 95% interval, win rates, HTML gallery",
            "mmalign.cli.eval"),
    Command("score", "score images with bundled reward models", "mmalign.cli.score"),
    Command("label", "turn a reward into preference labels for Pick-a-Pic-style pairs", "mmalign.cli.label"),
    Command("data", "dataset tools: FiFA filtering, DCPO captions, RPO pairs, BDHS, relabelling",
            "mmalign.cli.data"),
    Command("caption", "caption images with a captioner (ClipCap folder, BLIP hub id / folder)", "mmalign.cli.caption"),
    Command("demo", "Diffusion-DPO on the shipped shapes model: CPU, offline, minutes", "mmalign.cli.demo"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmalign", description="Preference alignment for multimodal generative models")
    sub = p.add_subparsers(dest="command", required=True)
    for c in COMMANDS:
        mod = importlib.import_module(c.module)  # by name: the table is the one place commands are listed
        sp = sub.add_parser(c.name, help=c.help, description=c.help)
        mod.add_arguments(sp)
        sp.set_defaults(func=mod.run)
    return p


def error_line(e: BaseException) -> str:
    """One line for a user-facing failure: the project's own errors say what to do; an OSError names its path."""
    if isinstance(e, OSError):
        where = " -> ".join(str(p) for p in (e.filename, e.filename2) if p)
        text = e.strerror or str(e)
        return f"{text}: {where}" if where else text
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success, 1 on bad input, a missing optional package or a failing file system (one ``error:`` line,
    no traceback; a bug still shows its traceback), 2 on a malformed command line (argparse), 130 on Ctrl-C."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"] and "--show" in argv:  # a flag among the positional overrides: argparse wants it last
        argv = [a for a in argv if a != "--show"] + ["--show"]
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (DataError, ConfigError, OSError, ImportError) as e:  # ImportError: an optional package, with its pip line
        print(f"error: {error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
