"""Small shared helpers on the ground floor: keyed random generators and console tables."""
from __future__ import annotations

import torch


def example_generator(seed: int, step: int, row: int, salt: int = 0) -> torch.Generator:
    """A CPU generator keyed by (seed, step, dataset row): the same example gets the same noise on
    any number of processes and after a resume."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7_919 + row * 104_729 + salt * 15_485_863) % (2**63 - 1))
    return g


def format_table(header: list[str], rows: list[list]) -> str:
    rows = [[str(x) for x in r] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(out)


def print_table(header: list[str], rows: list[list]):
    print(format_table(header, rows), flush=True)
