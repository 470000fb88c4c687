"""``mmalign train CONFIG [key=value ...]``: any recipe from a YAML config."""
from __future__ import annotations

# Library imports are inside run(): building the parser (mmalign --help) must not load torch (~4 s).


def add_arguments(p):
    p.add_argument("config", help="a YAML recipe config (configs/...)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. train.lr=1e-4 loss.beta=0.2")
    p.add_argument("--show", action="store_true", help="print every key of the bound config with its value, default "
                                                       "and documentation, then exit (nothing is trained)")


def run(args) -> int:
    import importlib

    from mmalign.train.sections import load_config

    cfg = load_config(args.config, args.overrides)
    if args.show:
        from mmalign.config_doc import show  # only for --show

        print(show(cfg))
        return 0
    module, fn = type(cfg).runner.split(":")
    getattr(importlib.import_module(module), fn)(cfg)  # the recipe named by the config
    close_process_group()
    return 0


def close_process_group():
    """End a multi-process run: every rank meets at a barrier, flushes its output and leaves with ``os._exit(0)``,
    skipping interpreter teardown. Left to teardown -- even after ``destroy_process_group()`` -- a rank sometimes
    aborted at exit (SIGABRT, "terminate called without an active exception": a C++ thread of the Gloo / store
    machinery destroyed while still joinable), so a finished run was reported as a failed launch (twice in about
    seven CI runs of five 2-process CPU launches each; never in 44 launches by hand). By then every file a run writes is closed (checkpoints, the
    final export, metrics.jsonl appends per line, trackers ended), so skipping teardown loses nothing."""
    import os
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
