"""Where shipped things live, and how config paths are resolved."""
from __future__ import annotations

import hashlib
import json
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


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".pth")
LORA_FILE = "pytorch_lora_weights.safetensors"  # the file name diffusers' save_lora_weights writes


def fingerprint(path: str | os.PathLike | None, suffixes: tuple[str, ...] | None = None) -> str | None:
    """A digest of the files at a local path -- each file's name relative to the path, size and modification
    time (``suffixes``: only files ending so) -- that changes when any of them is rewritten, without reading
    them. ``None`` for a path that is not local (a hub id: its revision is not known here)."""
    if path is None:
        return None
    root = Path(resolve(path))
    if not root.exists():
        return None
    files = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
    rows = [(str(f.relative_to(root)) if f != root else f.name, f.stat().st_size, f.stat().st_mtime_ns)
            for f in files if suffixes is None or f.name.endswith(suffixes)]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
