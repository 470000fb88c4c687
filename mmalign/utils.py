"""Small shared helpers on the ground floor: keyed random generators, console tables, folders written whole."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

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


def replace_dir(tmp: Path, final: Path):
    """Put a fully written folder ``tmp`` in place of ``final``: a crash at any point leaves either the old
    ``final`` or the new one, never a partial one (at worst a ``.old`` / ``.tmp`` folder beside it)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(path: str | Path):
    """``with atomic_folder(path) as tmp:`` fill ``tmp``; on success it replaces ``path`` whole (``replace_dir``),
    on an error nothing at ``path`` changes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    replace_dir(tmp, path)
