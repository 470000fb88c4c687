"""Argument checks shared by the commands: bad values are one ``error:`` line (a ``DataError``), not a traceback
from deep inside a pipeline."""
from __future__ import annotations

from mmalign.data.records import DataError


def check_positive(args, *names: str):
    """Each ``--name`` (argparse dest) must be >= 1."""
    for n in names:
        v = getattr(args, n)
        if v is not None and v < 1:
            raise DataError(f"--{n.replace('_', '-')} must be >= 1, got {v}")


def check_resolution(resolution: int | None):
    """Images are made in latent space: a side must be a positive multiple of 8 (16 for Flux, checked there)."""
    if resolution is not None and (resolution < 8 or resolution % 8):
        raise DataError(f"--resolution must be a positive multiple of 8, got {resolution}")
