"""Generic image I/O on the ground floor: opening image values from tables, listing and reading folders.

Every loader that joins a dataset folder with a file name taken from the data goes through
``contained_path``: a name that resolves outside the folder (``../x.png``, an absolute path, a symlink
pointing out) is a ``DataError`` naming the row, unless the caller opts in (``data.allow_outside_root``).
A path in a table resolves against the table's own folder (``records.table_root``), never the working
directory; a table without a folder (a hub dataset) may not name paths at all without the opt-in.
16-bit images (PNG mode ``I;16``) are scaled to 8 bits, not clipped to white.
"""
from __future__ import annotations

import glob
import io
import sys
from pathlib import Path

from PIL import Image

from .records import DataError

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


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with 16-bit greyscale (``I;16*``, or ``I`` holding 16-bit values) scaled to 8 bits: Pillow's own
    ``convert`` clips those values at 255, turning a 16-bit PNG pure white. Float images are refused."""
    if img.mode.startswith("I;16") or img.mode == "I":
        import numpy as np

        a = np.asarray(img, dtype=np.int64)
        if img.mode == "I" and a.max(initial=0) > 65535 or a.min(initial=0) < 0:
            raise ValueError(f"{img.mode} image with values outside 0..65535: not a 16-bit image")
        scale = 257.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.round(a / scale).astype(np.uint8), "L")
    elif img.mode == "F":
        raise ValueError("32-bit float image (mode F): convert it to 8 or 16 bits per channel")
    return img.convert("RGB")


def open_image(value, root: Path | None = None, allow_outside_root: bool = False, where: str = "") -> Image.Image:
    """bytes | {'bytes':..,'path':..} | PIL | path -> RGB PIL image (raises on corrupt data).

    A relative or absolute path is joined with ``root`` (the data's folder) and must stay inside it
    (``contained_path``); without a root a path is refused unless ``allow_outside_root`` (then it is opened
    as given) -- callers that open files they listed themselves say so."""
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
        if root is not None:
            p = contained_path(root, str(value), where, allow_outside_root)
        elif allow_outside_root:
            p = Path(value)
        else:
            raise DataError(f"{where + ': ' if where else ''}image path {str(value)!r} in data that has no folder of "
                            "its own (a hub dataset): refusing to read it. Set data.allow_outside_root=true (or "
                            "--allow-outside-root) if the data is trusted")
        img = Image.open(p)
    else:
        raise ValueError(f"unsupported image value of type {type(value).__name__}")
    img.load()
    return to_rgb(img)


def list_images(spec: str, allow_outside_root: bool = False) -> list[Path]:
    """Image files in a folder (recursively, sorted) or matching a glob pattern. A file in the folder that is a
    symlink resolving outside it is an error (as in training and ``eval``) unless ``allow_outside_root``."""
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXT)
        for f in files:
            contained_path(p, str(f.relative_to(p)), f"--images {spec}", allow_outside_root)
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
            images.append(open_image(f, allow_outside_root=True))  # files the caller listed (list_images checks)
            ok.append(f)
        except Exception as e:
            bad.append((f, str(e)))
    for f, e in bad:
        print(f"warning: skipped unreadable image {f}: {e}", file=sys.stderr)
    return ok, images, bad
