"""Where shipped things live, and how config paths are resolved."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(os.environ.get("MMALIGN_ASSETS", REPO_ROOT / "assets"))
TINY_TOKENIZER = ASSETS / "tokenizers" / "tiny-bpe"


def resolve(path: str | os.PathLike | None) -> str | None:
    """A path as given if it exists (relative to the cwd), else relative to the repository root
    (so ``assets/...`` in a shipped config works from any directory), else unchanged (a hub id)."""
    if path is None:
        return None
    p = Path(os.path.expanduser(str(path)))
    if p.exists():
        return str(p)
    q = REPO_ROOT / p
    if not p.is_absolute() and q.exists():
        return str(q)
    return str(path)
