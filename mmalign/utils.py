"""Small shared helpers: console tables."""
from __future__ import annotations


def format_table(header: list[str], rows: list[list]) -> str:
    rows = [[str(x) for x in r] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(out)


def print_table(header: list[str], rows: list[list]):
    print(format_table(header, rows), flush=True)
