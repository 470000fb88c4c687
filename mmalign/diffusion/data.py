"""Image preference pairs in the Pick-a-Pic v2 schema.

Columns: ``caption``, ``jpg_0``, ``jpg_1`` (encoded image bytes, an HF ``Image`` dict, a PIL image
or a file path), ``label_0`` (1 = image 0 preferred, 0 = image 1, 0.5 = tie), optional ``label_1``
(must equal 1 - label_0). DCPO's Pick-Double-Caption adds ``caption_0`` / ``caption_1``; PPD adds
``user_id``. Sources: parquet files/folders, ``save_to_disk`` folders, hub names, or an
imagefolder-style directory whose ``metadata.jsonl`` names ``file_name_0`` / ``file_name_1``.

Ties are dropped by default (counted and reported). The winner always comes first. Resize, crop
and flip are the same for both images of a pair.
"""
from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image

from mmalign.data.images import contained_path, open_image
from mmalign.data.records import DataError, load_table, rename_columns, require_columns, table_root
from mmalign.data.text import _Batch
from mmalign.paths import resolve

Tensor = torch.Tensor


@dataclass
class PairLatents(_Batch):
    """Both images of each pair as VAE posteriors in the model's latent space, in both orientations (the cache's,
    or an online round's samples): [B, 2, C, h, w] each, winner first."""

    mean: Tensor
    mean_flip: Tensor
    std: Optional[Tensor] = None  # posterior std (for data.vae_latents=sample)
    std_flip: Optional[Tensor] = None

    def pick(self, flip: list[bool]) -> tuple[Tensor, Optional[Tensor]]:
        """(mean, std) of each pair's drawn orientation."""
        pick = lambda a, b: torch.stack([(b[i] if f else a[i]) for i, f in enumerate(flip)])  # noqa: E731
        return pick(self.mean, self.mean_flip), None if self.std is None else pick(self.std, self.std_flip)


@dataclass
class PairText(_Batch):
    """Encoded captions: the winner's, and under DCPO the loser's own (None: the winner's serves both)."""

    embeds_w: Tensor
    embeds_l: Optional[Tensor] = None
    pooled_w: Optional[Tensor] = None  # pooled embeddings (SDXL, SD3, Flux)
    pooled_l: Optional[Tensor] = None


@dataclass
class ImagePairBatch(_Batch):
    """A batch of preference pairs: per-pair metadata, and the images as ``pixels`` (read from the data) or as
    ``latents`` (cached or sampled); ``text`` when the captions come encoded (the cache), else they are encoded
    in the step."""

    captions: list  # prompt per pair (the winner's caption under DCPO)
    index: Tensor  # [B] dataset rows (after tie filtering)
    original_size: Tensor  # [B, 2] (h, w) of image 0, for SDXL micro-conditioning
    crop_top_left: Tensor  # [B, 2]
    captions_rejected: Optional[list] = None  # DCPO: the loser's own caption
    user_ids: Optional[list] = None  # PPD
    labels: Optional[Tensor] = None  # [B] soft labels y = P(image 0 preferred), label_mode "soft" (RPO)
    skipped: int = 0  # corrupt rows dropped from this batch
    unreadable_rows: Optional[list] = None  # which rows those were (a cache filled while training records them)
    pixels: Optional[Tensor] = None  # [B, 2, 3, H, W] in [-1, 1], winner first
    latents: Optional[PairLatents] = None
    text: Optional[PairText] = None

    def __len__(self):
        return len(self.index)


def load_pairs_table(source: str, split: str = "train", allow_outside_root: bool = False):
    """(table, root): like ``load_table``, plus imagefolder-style folders (``metadata.jsonl`` with ``file_name_0``
    / ``file_name_1``). ``root`` is the folder image paths resolve against (``table_root``; ``None`` for a hub
    dataset); every path must stay inside it unless ``allow_outside_root``. HF ``Image`` columns are read
    undecoded, so that ``datasets`` never opens a path itself."""
    import datasets

    p = Path(resolve(source))
    meta = p / "metadata.jsonl"
    if p.is_dir() and meta.exists():
        rows = [json.loads(x) for x in open(meta) if x.strip()]
        for i, r in enumerate(rows):
            for k in ("0", "1"):
                if f"file_name_{k}" in r and f"jpg_{k}" not in r:
                    r[f"jpg_{k}"] = r.pop(f"file_name_{k}")
                if isinstance(r.get(f"jpg_{k}"), str):
                    contained_path(p, r[f"jpg_{k}"], f"{meta}: row {i}: jpg_{k}", allow_outside_root)
        return datasets.Dataset.from_list(rows), p
    ds = load_table(source, split)
    for col in ("jpg_0", "jpg_1"):
        if isinstance(ds.features.get(col), datasets.Image):
            ds = ds.cast_column(col, datasets.Image(decode=False))
    return ds, table_root(source)


def _numbers(values, column: str, source: str) -> list[float]:
    out = []
    for i, x in enumerate(values):
        try:
            if isinstance(x, (bool, str)) or x is None:
                raise TypeError
            out.append(float(x))
        except (TypeError, ValueError):
            raise DataError(f"{source}: row {i}: {column} must be a number (1, 0 or 0.5), got {x!r}") from None
    return out


class PreferencePairs(torch.utils.data.Dataset):
    def __init__(self, source: str, split: str = "train", resolution: int = 512, center_crop: bool = True,
                 drop_ties: bool = True, columns: dict | None = None, max_examples: int | None = None,
                 seed: int = 0, dual_captions: bool = False, with_user: bool = False, soft_labels: bool = False,
                 allow_outside_root: bool = False):
        ds, self.root = load_pairs_table(source, split, allow_outside_root)
        self.allow_outside_root = allow_outside_root
        ds = rename_columns(ds, columns or {}, source)
        need = ["jpg_0", "jpg_1", "label_0"] + (["caption_0", "caption_1"] if dual_captions else ["caption"])
        if with_user:
            need.append("user_id")
        require_columns(ds, need, source, "image preference pairs (Pick-a-Pic v2 schema)")
        self.source, self.resolution, self.center_crop, self.seed = source, resolution, center_crop, seed
        self.dual, self.with_user = dual_captions, with_user
        l0 = _numbers(ds["label_0"], "label_0", source)
        l1 = _numbers(ds["label_1"], "label_1", source) if "label_1" in ds.column_names else [1.0 - x for x in l0]
        for c in (["caption_0", "caption_1"] if dual_captions else ["caption"]):
            bad = next((i for i, x in enumerate(ds[c]) if not isinstance(x, str)), None)
            if bad is not None:
                raise DataError(f"{source}: row {bad}: {c} must be a string, got {type(ds[c][bad]).__name__}")
        keep, ties = [], 0
        for i, (a, b) in enumerate(zip(l0, l1)):
            if soft_labels:  # any P(image 0 preferred) in [0, 1]; order kept, nothing dropped
                if not (0.0 <= a <= 1.0) or abs(a + b - 1.0) > 1e-6:
                    raise DataError(f"{source}: row {i}: soft labels label_0={a}, label_1={b} must be in [0, 1] "
                                    "and sum to 1")
                keep.append(i)
                continue
            if a not in (0.0, 0.5, 1.0) or abs(a + b - 1.0) > 1e-6:
                raise DataError(f"{source}: row {i}: label_0={a}, label_1={b}; expected (1, 0), (0, 1) or a tie (0.5, 0.5)")
            if a == 0.5:
                ties += 1
                if not drop_ties:
                    raise DataError(f"{source}: row {i} is a tie (0.5/0.5); Diffusion-DPO needs a preference. "
                                    "Keep data.drop_ties=true to drop ties")
                continue
            keep.append(i)
        if max_examples is not None:
            keep = keep[:max_examples]
        if not keep:
            raise DataError(f"{source}: no non-tie pairs ({ties} ties dropped)")
        self.soft = soft_labels
        self.labels = [l0[i] for i in keep]
        self.ds, self.rows, self.ties = ds, keep, ties
        self.swap = [False] * len(keep) if soft_labels else [l0[i] == 0.0 for i in keep]
        self.skipped_rows: list[int] = []

    def __len__(self):
        return len(self.rows)

    def describe(self) -> str:
        return f"{len(self)} pairs ({self.ties} ties dropped) from {self.source}"

    def _crop_box(self, w: int, h: int, i: int) -> tuple[int, int, int, int, float]:
        """torchvision's geometry, pixel for pixel: ``Resize(r)`` scales the short side to r and the long
        side to ``int(r * long / short)`` (truncated); ``CenterCrop(r)`` starts at ``int(round(slack / 2))``.
        A random crop is drawn once per (seed, row) -- deterministic, resumable and cacheable; the peers
        redraw it every time an image is loaded (see the README's deviations table)."""
        r = self.resolution
        if w <= h:
            nw, nh = r, int(r * h / w)
        else:
            nw, nh = int(r * w / h), r
        if self.center_crop:
            top, left = int(round((nh - r) / 2.0)), int(round((nw - r) / 2.0))
        else:  # deterministic per (seed, row): same crop on every process and after resume
            g = np.random.default_rng(self.seed * 1_000_003 + i)
            top, left = int(g.integers(0, nh - r + 1)), int(g.integers(0, nw - r + 1))
        return nw, nh, top, left, r / min(w, h)

    def _transform(self, img: Image.Image, size_and_box) -> Tensor:
        nw, nh, top, left, _ = size_and_box
        r = self.resolution
        img = img.resize((nw, nh), Image.BILINEAR).crop((left, top, left + r, top + r))
        arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
        return arr / 127.5 - 1.0

    def load_images(self, i: int) -> tuple[Image.Image, Image.Image]:
        a, b = self._open(i)
        return (b, a) if self.swap[i] else (a, b)

    def _open(self, i: int):
        row, r = self.ds[self.rows[i]], self.rows[i]
        return tuple(open_image(row[k], self.root, self.allow_outside_root, f"{self.source}: row {r}: {k}")
                     for k in ("jpg_0", "jpg_1"))

    def __getitem__(self, i):
        i = int(i)
        row = self.ds[self.rows[i]]
        try:
            a, b = self._open(i)
        except DataError:  # a path outside the dataset folder is an error, not an unreadable image
            raise
        except Exception as e:  # corrupt / unreadable: report by row and skip, never crash the batch
            print(f"warning: {self.source}: row {self.rows[i]}: unreadable image ({e}); skipped", file=sys.stderr)
            self.skipped_rows.append(self.rows[i])
            return None
        b = b.resize(a.size, Image.BILINEAR) if b.size != a.size else b  # jpg_1 follows jpg_0 (diffusers SDXL)
        box = self._crop_box(a.width, a.height, self.rows[i])
        pix = torch.stack([self._transform(a, box), self._transform(b, box)])
        swap = self.swap[i]
        if swap:
            pix = pix.flip(0)
        out = {"pixels": pix, "index": i, "original_size": (a.height, a.width),
               "crop_top_left": (box[2], box[3]), "label": self.labels[i]}
        if self.dual:
            c0, c1 = row["caption_0"], row["caption_1"]
            out["caption"], out["caption_rejected"] = (c1, c0) if swap else (c0, c1)
        else:
            out["caption"] = row["caption"]
        if self.with_user:
            out["user_id"] = row["user_id"]
        return out

    def collate(self, items: list) -> ImagePairBatch:
        good = [x for x in items if x is not None]
        skipped = len(items) - len(good)
        if not good:
            return ImagePairBatch([], torch.zeros(0, dtype=torch.long), torch.zeros(0, 2), torch.zeros(0, 2),
                                  skipped=skipped)
        return ImagePairBatch(
            pixels=torch.stack([x["pixels"] for x in good]),
            captions=[x["caption"] for x in good],
            index=torch.tensor([x["index"] for x in good]),
            original_size=torch.tensor([x["original_size"] for x in good], dtype=torch.float32),
            crop_top_left=torch.tensor([x["crop_top_left"] for x in good], dtype=torch.float32),
            captions_rejected=[x["caption_rejected"] for x in good] if self.dual else None,
            user_ids=[x["user_id"] for x in good] if self.with_user else None,
            labels=torch.tensor([x["label"] for x in good], dtype=torch.float32) if self.soft else None,
            skipped=skipped,
        )


def write_pickapic_parquet(path: str | Path, rows: list[dict]):
    """Write pairs as a Pick-a-Pic-style parquet file: PIL images are JPEG/PNG-encoded to bytes."""
    import datasets

    def enc(img):
        if isinstance(img, Image.Image):
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return buf.getvalue()
        return img

    out = []
    for r in rows:
        r = dict(r)
        for k in ("jpg_0", "jpg_1"):
            r[k] = enc(r[k])
        out.append(r)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(out).to_parquet(str(path))


def wrap_label(text: str, width: int, draw) -> list[str]:
    """Words of ``text`` in lines no wider than ``width`` pixels (a word wider than a line is cut by characters)."""
    lines, cur = [], ""
    for word in text.split():
        while draw.textlength(word) > width and len(word) > 1:  # cut a word that cannot fit on any line
            k = max([i for i in range(1, len(word) + 1) if draw.textlength(word[:i]) <= width] or [1])
            if cur:
                lines.append(cur)
                cur = ""
            lines.append(word[:k])
            word = word[k:]
        trial = f"{cur} {word}".strip()
        if draw.textlength(trial) <= width:
            cur = trial
        else:
            lines.append(cur)
            cur = word
    return lines + ([cur] if cur else [])


def make_grid(images: list[Image.Image], cols: int, labels: list[str] | None = None, pad: int = 2) -> Image.Image:
    """Tile PIL images into one grid (for validation samples); optional text label under each, wrapped over as
    many lines as the longest label needs (never cut)."""
    from PIL import ImageDraw

    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [wrap_label(t, w - 2, probe) for t in labels] if labels else []
    lh = 11 * max((len(x) for x in wrapped), default=0) + (1 if labels else 0)
    grid = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + lh + pad) + pad), (255, 255, 255))
    d = ImageDraw.Draw(grid)
    for k, im in enumerate(images):
        r, c = divmod(k, cols)
        x, y = pad + c * (w + pad), pad + r * (h + lh + pad)
        grid.paste(im.resize((w, h)), (x, y))
        for i, line in enumerate(wrapped[k] if labels else []):
            d.text((x + 1, y + h + 11 * i), line, fill=(0, 0, 0))
    return grid
