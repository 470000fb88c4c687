"""Generic image I/O on the ground floor: opening image values from tables, listing and reading folders.

Every loader that joins a dataset folder with a file name taken from the data goes through
``contained_path``: a name that resolves outside the folder (``../x.png``, an absolute path, a symlink
pointing out) is a ``DataError`` naming the row, unless the caller opts in (``data.allow_outside_root``).
"""
from __future__ import annotations

import glob
import io
import logging
import sys
from pathlib import Path

from PIL import Image

from .records import DataError

log = logging.getLogger(__name__)
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def contained_path(root: Path, name: str, where: str = "", allow_outside_root: bool = False) -> Path:
    """``root / name``, refusing a name that resolves outside ``root`` (after ``..`` and symlinks)."""
    p = Path(name)
    full = p if p.is_absolute() else Path(root) / p
    if not allow_outside_root:
        base = Path(root).resolve()
        real = full.resolve()
        if real != base and base not in real.parents:
            raise DataError(f"{where + ': ' if where else ''}file name {name!r} resolves outside the dataset folder "
                            f"{base} (to {real}); refusing to read it. Set data.allow_outside_root=true (or "
                            "--allow-outside-root) if the data is trusted")
    return full


def open_image(value, root: Path | None = None, allow_outside_root: bool = False, where: str = "") -> Image.Image:
    """bytes | {'bytes':..,'path':..} | PIL | path -> RGB PIL image (raises on corrupt data).

    A relative or absolute path is joined with ``root`` and must stay inside it (``contained_path``);
    without a root, a path is opened as given (a table's own paths, relative to the working directory)."""
    if isinstance(value, Image.Image):
        img = value
    elif isinstance(value, (bytes, bytearray)):
        img = Image.open(io.BytesIO(value))
    elif isinstance(value, dict):
        if value.get("bytes") is not None:
            img = Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path"):
            return open_image(value["path"], root, allow_outside_root, where)
        else:
            raise ValueError("image dict has neither bytes nor path")
    elif isinstance(value, (str, Path)):
        p = contained_path(root, str(value), where, allow_outside_root) if root is not None else Path(value)
        img = Image.open(p)
    else:
        raise ValueError(f"unsupported image value of type {type(value).__name__}")
    img.load()
    return img.convert("RGB")


def list_images(spec: str) -> list[Path]:
    """Image files in a folder (recursively, sorted) or matching a glob pattern."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXT)
    else:
        files = sorted(Path(f) for f in glob.glob(spec, recursive=True) if Path(f).suffix.lower() in IMAGE_EXT)
    if not files:
        raise DataError(f"no images found at {spec!r}")
    return files


def read_images(files: list[Path]):
    """Open every file; unreadable ones are reported by path and skipped. Returns (ok files, images, bad)."""
    ok, images, bad = [], [], []
    for f in files:
        try:
            images.append(open_image(f))
            ok.append(f)
        except Exception as e:
            bad.append((f, str(e)))
    for f, e in bad:
        print(f"warning: skipped unreadable image {f}: {e}", file=sys.stderr)
    return ok, images, bad
