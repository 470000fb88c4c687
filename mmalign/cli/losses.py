"""``mmalign losses``: the registered losses with their kind and paper equation."""
from __future__ import annotations

# Library imports are inside run(): building the parser (mmalign --help) must not load torch (~4 s).


def add_arguments(p):
    pass


def run(args) -> int:
    from mmalign.losses import loss_table
    from mmalign.utils import print_table

    print_table(["name", "kind", "objective"], [list(r) for r in loss_table()])
    return 0
