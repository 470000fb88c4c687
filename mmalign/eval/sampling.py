"""Sampling a text-to-image pipeline: the one sampling loop (``sample_images``: validation grids, the demo,
``mmalign sample`` / ``eval``) and sampled folders with their ``metadata.jsonl`` (the first half of every
post-fine-tune evaluation; ``mmalign.diffusion.sampling.load_pipeline`` builds the pipeline).

``sample_to_folder`` writes one PNG per (prompt, seed) and a ``metadata.jsonl`` that ``mmalign score`` and
``mmalign eval`` read. Each row records what made its image (``made_by``: the model and a fingerprint of its
weight files, the LoRA and the SHA-256 of its file, dtype; plus prompt, seed, steps, guidance, resolution); rows
are appended as images are written, so an interrupted run resumes, and an image already in the folder is reused
only when its row matches the new request exactly -- any other image is sampled again, and the run says how many.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmalign.data.records import DataError
from mmalign.paths import LORA_FILE, WEIGHT_SUFFIXES, fingerprint, resolve


def image_name(prompt_index: int, seed: int) -> str:
    return f"{prompt_index:05d}-seed{seed}.png"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def made_by(model: str, lora: str | None = None, kind: str | None = None, dtype: str = "float32") -> dict:
    """What identifies the weights behind an image, for ``sample_to_folder(meta=...)``: the model (local
    folders by absolute path and weight-file fingerprint), the LoRA by absolute path and SHA-256 of its file."""
    local = Path(resolve(model))
    out = {"model": str(local.resolve()) if local.exists() else model, "model_files": fingerprint(model, WEIGHT_SUFFIXES),
           "kind": kind, "dtype": dtype, "lora": None, "lora_sha256": None}
    if lora:
        p = Path(lora)
        f = p / LORA_FILE if p.is_dir() else p
        out.update(lora=str(p.resolve()), lora_sha256=_sha256(f) if f.is_file() else None)
    return out


def _existing_rows(meta_file: Path) -> dict[str, dict]:
    """The last row per file name of an earlier ``metadata.jsonl`` (unreadable lines are ignored: their images
    are sampled again)."""
    rows = {}
    if meta_file.is_file():
        for line in meta_file.read_text().splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if isinstance(r, dict) and "file_name" in r:
                rows[r["file_name"]] = r
    return rows


@torch.no_grad()
def sample_images(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float, resolution: int | None = None,
                  batch_size: int | None = None) -> list:
    """One PIL image per (prompt, seed) with a diffusers pipeline, ``batch_size`` at a time (all at once by default);
    each image from its own generator seeded with its seed -- the one text-to-image sampling loop (validation grids,
    ``mmalign sample`` / ``eval``, the demo)."""
    kw = {"height": resolution, "width": resolution} if resolution else {}
    n = batch_size or max(1, len(prompts))
    out = []
    for lo in range(0, len(prompts), n):
        gens = [torch.Generator().manual_seed(s) for s in seeds[lo: lo + n]]
        out += pipe(prompts[lo: lo + n], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                    output_type="pil", **kw).images
    return out


def sample_to_folder(pipe, prompts: list[str], seeds: list[int], out: str | Path, steps: int = 30,
                     guidance: float = 5.0, resolution: int | None = None, batch_size: int = 8,
                     meta: dict | None = None, progress: bool = True) -> list[dict]:
    """One image per (prompt, seed) under ``out`` and ``out/metadata.jsonl``; returns the rows. ``meta``
    (``made_by(...)``) says which weights sample; images of an earlier run are reused only when they were made
    by the same weights with the same prompt, seed, steps, guidance and resolution."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta_file = out / "metadata.jsonl"
    rows = [{"file_name": image_name(i, s), "prompt": p, "prompt_index": i, "seed": s, "steps": steps,
             "guidance": guidance, "resolution": resolution, **(meta or {})} for i, p in enumerate(prompts)
            for s in seeds]
    old = _existing_rows(meta_file)
    todo = [r for r in rows if not ((out / r["file_name"]).exists() and old.get(r["file_name"]) == r)]
    stale = sum((out / r["file_name"]).exists() for r in todo)
    if stale:
        print(f"{out}: {stale} image(s) there were made by other weights or settings (model, LoRA, prompt, steps, "
              "guidance or resolution): sampling them again", flush=True)
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc=f"sampling -> {out}", dynamic_ncols=True,
               disable=not progress)
    for lo in range(0, len(todo), batch_size):
        chunk = todo[lo: lo + batch_size]
        images = sample_images(pipe, [r["prompt"] for r in chunk], [r["seed"] for r in chunk], steps, guidance,
                               resolution)
        for r, im in zip(chunk, images):
            tmp = out / (r["file_name"] + ".tmp.png")
            im.save(tmp)
            tmp.replace(out / r["file_name"])  # a killed run leaves no half-written image behind
        with open(meta_file, "a") as f:  # the record follows its images: a resumed run can trust both
            f.write("".join(json.dumps(r) + "\n" for r in chunk))
        bar.update(len(chunk))
    bar.close()
    tmp = meta_file.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(meta_file)
    return rows


def read_metadata(folder: str | Path) -> list[dict]:
    """The rows of a sampled folder's ``metadata.jsonl`` (each with file_name, prompt, seed)."""
    f = Path(folder) / "metadata.jsonl"
    if not f.is_file():
        raise DataError(f"{folder}: no metadata.jsonl (sample it with mmalign sample, or write file_name / prompt "
                        "/ seed rows)")
    rows = []
    for i, x in enumerate(f.read_text().splitlines(), 1):
        if not x.strip():
            continue
        try:
            r = json.loads(x)
        except ValueError as e:
            raise DataError(f"{f}:{i}: invalid JSON line ({e})") from None
        missing = [k for k in ("file_name", "prompt", "seed") if not isinstance(r, dict) or k not in r]
        if missing:
            raise DataError(f"{f}:{i}: lacks {missing}")
        if isinstance(r["seed"], bool) or not isinstance(r["seed"], int):
            raise DataError(f"{f}:{i}: seed must be an integer, got {r['seed']!r}")
        rows.append(r)
    return rows
