"""A latent + text cache filled by the training steps themselves (``data.cache_build=while_training``).

``build_cache`` encodes every pair before the first step, both orientations of both images: the right trade
when the run reads its data more than once (from the second epoch on the step never runs the VAE or the text
encoders, and they are not even loaded). A run that reads each pair at most once -- a LoRA run over part of
Pick-a-Pic -- would pay twice the VAE work of the diffusers script for nothing. Here instead the step encodes
what it draws, as the script does (the drawn orientation of each image, its caption once), and keeps it:
``CacheFill`` holds the encodings, keyed ``"<row>/<key>"``, in ``<cache>/fill/part-<rank>-<n>.safetensors``
files (written whole, temp file + rename; a killed run loses at most the unwritten tail). A later run reuses
them; once every row is in (both orientations under ``random_flip``, or marked unreadable) the next run turns
the parts into the ordinary shard cache (``cache.compact_fill``) and runs as on an up-front cache. Over any
number of passes this never encodes more than the up-front build (1 + 1/2 + 1/4 ... of it with random flips).
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

Tensor = torch.Tensor
KEEP_FLOAT32 = ("size",)  # SDXL micro-conditioning (original size, crop corner): exact, whatever the cache dtype


class CacheFill:
    """Encodings of ``(row, key)`` kept as the steps make them: ``get`` / ``put``; ``flush`` writes a part."""

    def __init__(self, path: str | Path, dtype: torch.dtype, rank: int = 0, flush_every: int = 512):
        self.dir, self.dtype, self.rank, self.flush_every = Path(path) / "fill", dtype, rank, flush_every
        self.index: dict[str, Path] = {}
        self.pending: dict[str, Tensor] = {}
        self._open: dict[Path, object] = {}
        for f in sorted(self.dir.glob("part-*.safetensors")):
            with safe_open(str(f), "pt") as h:
                self.index.update({k: f for k in h.keys()})

    def get(self, row: int, key: str) -> Tensor | None:
        name = f"{row}/{key}"
        if name in self.pending:
            return self.pending[name]
        f = self.index.get(name)
        if f is None:
            return None
        if f not in self._open:
            if len(self._open) >= 16:  # a long fill has thousands of parts: keep few files open
                self._open.pop(next(iter(self._open)))
            self._open[f] = safe_open(str(f), "pt")
        return self._open[f].get_tensor(name)

    def has(self, row: int, key: str) -> bool:
        name = f"{row}/{key}"
        return name in self.pending or name in self.index

    def put(self, row: int, key: str, value: Tensor) -> Tensor:
        """Keep ``value`` (rounded to the cache dtype, as the shard cache stores it) and return what was kept,
        so the step that encoded it computes with exactly what a later step will read."""
        v = value.detach().cpu().to(torch.float32 if key in KEEP_FLOAT32 else self.dtype).contiguous()
        self.pending[f"{row}/{key}"] = v
        if len(self.pending) >= self.flush_every:
            self.flush()
        return v

    def flush(self):
        if not self.pending:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        f = self.dir / f"part-{self.rank}-{uuid.uuid4().hex[:12]}.safetensors"
        tmp = f.with_name(f".{f.name}.tmp")
        save_file(self.pending, str(tmp))
        os.replace(tmp, f)
        self.index.update({k: f for k in self.pending})
        self.pending = {}

    def rows(self) -> dict[int, set[str]]:
        """Every row with an encoding, and its keys."""
        out: dict[int, set[str]] = {}
        for name in [*self.index, *self.pending]:
            row, key = name.split("/", 1)
            out.setdefault(int(row), set()).add(key)
        return out


def required_keys(flips: bool, std: bool, dual: bool) -> set[str]:
    """The keys a row needs before the fill can become a shard cache (``cache_meta``'s settings)."""
    keys = {"latents", "size", "embeds_w"} | ({"embeds_l"} if dual else set())
    for suffix in ("", "_flip") if flips else ("",):
        keys |= {f"latents{suffix}"} | ({f"latents_std{suffix}"} if std else set())
    return keys


class MarkUnreadable(torch.utils.data.Dataset):
    """``PreferencePairs`` whose batches also name their unreadable rows (``ImagePairBatch.unreadable_rows``),
    so the fill records them -- from DataLoader workers too -- and a fill with every row known can be compacted."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __getattr__(self, name):
        return getattr(self.__dict__["pairs"], name)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        item = self.pairs[i]
        return {"unreadable": int(i)} if item is None else item

    def collate(self, items: list):
        bad = [x["unreadable"] for x in items if x is not None and "unreadable" in x]
        batch = self.pairs.collate([None if x is None or "unreadable" in x else x for x in items])
        batch.unreadable_rows = bad
        return batch
