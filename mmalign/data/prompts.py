"""Prompt lists for sampling and evaluation: a file, or a named prompt set.

``load_prompts(spec)``: ``spec`` is a .txt file (one prompt per line), a .jsonl / .json / .csv / .parquet
table with a ``prompt`` (or ``caption`` / ``text``) column, or the name of a prompt set:

* ``shapes``            the 18 shapes-world prompts (shipped, ``assets/prompts/shapes.txt``)
* ``partiprompts``      PartiPrompts, 1632 prompts (Yu et al. 2022; google-research/parti, Apache-2.0)
* ``hpdv2-anime``, ``hpdv2-concept-art``, ``hpdv2-paintings``, ``hpdv2-photo``
                        the HPDv2 benchmark prompts, 800 each (Wu et al. 2023; tgxs002/HPSv2, Apache-2.0)

Only ``shapes`` ships: the other files could be shipped under their licences, but this project's build
machines reach package registries only, and no registry package carries them. Put the file (as
published by its authors) in ``$MMALIGN_PROMPTS`` or ``~/.cache/mmalign/prompts`` under the set's file
name and the name resolves to it.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from mmalign.paths import ASSETS, resolve

from .records import DataError, load_table

PROMPT_SETS = {
    "shapes": ("shapes.txt", "shipped with mmalign"),
    "partiprompts": ("PartiPrompts.tsv", "google-research/parti, PartiPrompts.tsv (Apache-2.0)"),
    "hpdv2-anime": ("anime.json", "tgxs002/HPSv2 benchmark prompts, anime.json (Apache-2.0)"),
    "hpdv2-concept-art": ("concept-art.json", "tgxs002/HPSv2 benchmark prompts, concept-art.json (Apache-2.0)"),
    "hpdv2-paintings": ("paintings.json", "tgxs002/HPSv2 benchmark prompts, paintings.json (Apache-2.0)"),
    "hpdv2-photo": ("photo.json", "tgxs002/HPSv2 benchmark prompts, photo.json (Apache-2.0)"),
}


def prompt_dirs() -> list[Path]:
    dirs = [ASSETS / "prompts"]
    if os.environ.get("MMALIGN_PROMPTS"):
        dirs.append(Path(os.environ["MMALIGN_PROMPTS"]))
    dirs.append(Path.home() / ".cache" / "mmalign" / "prompts")
    return dirs


def _from_file(p: Path) -> list[str]:
    suffix = p.suffix.lower()
    if suffix == ".txt":
        return [x.strip() for x in p.read_text().splitlines() if x.strip()]
    if suffix == ".tsv":  # PartiPrompts: a "Prompt" column
        rows = list(csv.DictReader(p.open(), delimiter="\t"))
        key = next((k for k in ("Prompt", "prompt") if rows and k in rows[0]), None)
        if key is None:
            raise DataError(f"{p}: a .tsv prompt file needs a 'Prompt' column")
        return [r[key] for r in rows]
    if suffix == ".json" and isinstance(json.loads(p.read_text()), list) and \
            all(isinstance(x, str) for x in json.loads(p.read_text())):  # HPDv2: a JSON list of strings
        return json.loads(p.read_text())
    table = load_table(str(p))
    col = next((c for c in ("prompt", "caption", "text", "Prompt") if c in table.column_names), None)
    if col is None:
        raise DataError(f"{p}: no prompt column (prompt / caption / text); it has {table.column_names}")
    return [str(x) for x in table[col]]


def load_prompts(spec: str) -> list[str]:
    """The prompts of a file or a named set (see the module docstring); clear errors for both."""
    p = Path(resolve(spec))  # like data.train: the working directory, then the repository (shipped configs)
    if p.is_file():
        prompts = _from_file(p)
    elif spec in PROMPT_SETS:
        fname, source = PROMPT_SETS[spec]
        found = next((d / fname for d in prompt_dirs() if (d / fname).is_file()), None)
        if found is None:
            raise DataError(f"prompt set {spec!r} is not on this machine: put {fname} ({source}) in one of "
                            f"{[str(d) for d in prompt_dirs()]}")
        prompts = _from_file(found)
    elif p.suffix:
        raise DataError(f"prompt file not found: {spec}")
    else:
        raise DataError(f"unknown prompt set {spec!r}; known: {sorted(PROMPT_SETS)} (or pass a file)")
    if not prompts:
        raise DataError(f"{spec}: no prompts")
    return prompts
