"""Sampling a text-to-image model to a folder: the first half of every post-fine-tune evaluation.

``load_pipeline(model, lora=DIR)`` builds the diffusers pipeline of the model's family (read from its
``model_index.json``), with an optional LoRA that must fit the base. ``sample_to_folder`` writes one
PNG per (prompt, seed) and a ``metadata.jsonl`` (file_name, prompt, seed, model, lora, steps, guidance)
that ``mmalign score`` and ``mmalign eval`` read; it skips images already written, so an interrupted
run resumes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmalign.data.records import DataError
from mmalign.paths import resolve

from .models import FLOW_KINDS, load_components

PIPELINE_KINDS = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
                  "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
LORA_FILE = "pytorch_lora_weights.safetensors"


def detect_kind(model: str) -> str:
    """The model family from the pipeline's ``model_index.json`` (a local folder or a hub id)."""
    path = Path(resolve(model))
    try:
        if (path / "model_index.json").is_file():
            cls = json.loads((path / "model_index.json").read_text())["_class_name"]
        else:
            from diffusers import DiffusionPipeline

            cls = DiffusionPipeline.load_config(model)["_class_name"]
    except Exception as e:
        raise DataError(f"cannot read the pipeline of {model!r} (a diffusers folder with model_index.json, or a "
                        f"hub id while online): {e}") from e
    if cls not in PIPELINE_KINDS:
        raise DataError(f"{model}: pipeline {cls} is not one of the supported families {sorted(PIPELINE_KINDS)}")
    return PIPELINE_KINDS[cls]


def apply_lora(pipe, lora: str, model: str = "the base model"):
    """``pipe.load_lora_weights(lora)``, refusing a LoRA that does not fit: a missing file, a load error
    (shapes or module names of another model), or a load that attached no adapter at all."""
    p = Path(lora)
    if not (p / LORA_FILE).is_file() and not (p.is_file() and p.suffix == ".safetensors"):
        raise DataError(f"LoRA {lora}: no {LORA_FILE} there (an mmalign or diffusers LoRA export)")
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    try:
        pipe.load_lora_weights(str(p))
    except Exception as e:
        raise DataError(f"LoRA {lora} does not fit {model}: {type(e).__name__}: {e}") from e
    if not any("lora_" in n for n, _ in denoiser.named_parameters()):
        raise DataError(f"LoRA {lora} does not fit {model}: none of its layers matched the "
                        f"{type(denoiser).__name__} (trained on another model family?)")


def load_pipeline(model: str, lora: str | None = None, kind: str | None = None, device=None,
                  dtype: torch.dtype = torch.float32):
    """(pipeline, kind): the model's components in its family's pipeline (DDIM for SD/SDXL, flow-matching
    Euler for SD3/Flux), optionally with a LoRA."""
    kind = kind or detect_kind(model)
    comp = load_components(kind, model, dtype=dtype)
    if dtype != torch.float32:
        comp.denoiser.to(dtype=dtype)
    pipe = comp.pipeline(scheduler="ddim")
    if lora:
        apply_lora(pipe, lora, model)
    if device is not None:
        pipe.to(device)
    return pipe, kind


def image_name(prompt_index: int, seed: int) -> str:
    return f"{prompt_index:05d}-seed{seed}.png"


@torch.no_grad()
def sample_to_folder(pipe, prompts: list[str], seeds: list[int], out: str | Path, steps: int = 30,
                     guidance: float = 5.0, resolution: int | None = None, batch_size: int = 8,
                     meta: dict | None = None, progress: bool = True) -> list[dict]:
    """One image per (prompt, seed) under ``out`` (resumable), and ``out/metadata.jsonl``; returns the rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = [(i, p, s) for i, p in enumerate(prompts) for s in seeds]
    todo = [x for x in plan if not (out / image_name(x[0], x[2])).exists()]
    kw = {"height": resolution, "width": resolution} if resolution else {}
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc=f"sampling -> {out}", dynamic_ncols=True,
               disable=not progress)
    for lo in range(0, len(todo), batch_size):
        chunk = todo[lo: lo + batch_size]
        gens = [torch.Generator().manual_seed(s) for _, _, s in chunk]
        images = pipe([p for _, p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                      output_type="pil", **kw).images
        for (i, _, s), im in zip(chunk, images):
            tmp = out / (image_name(i, s) + ".tmp.png")
            im.save(tmp)
            tmp.replace(out / image_name(i, s))  # a killed run leaves no half-written image behind
        bar.update(len(chunk))
    bar.close()
    rows = [{"file_name": image_name(i, s), "prompt": p, "prompt_index": i, "seed": s, "steps": steps,
             "guidance": guidance, **(meta or {})} for i, p, s in plan]
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def read_metadata(folder: str | Path) -> list[dict]:
    """The rows of a sampled folder's ``metadata.jsonl`` (each with file_name, prompt, seed)."""
    f = Path(folder) / "metadata.jsonl"
    if not f.is_file():
        raise DataError(f"{folder}: no metadata.jsonl (sample it with mmalign sample, or write file_name / prompt "
                        "/ seed rows)")
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    for i, r in enumerate(rows):
        missing = [k for k in ("file_name", "prompt", "seed") if k not in r]
        if missing:
            raise DataError(f"{f}: row {i} lacks {missing}")
    return rows


__all__ = ["detect_kind", "load_pipeline", "apply_lora", "sample_to_folder", "read_metadata", "image_name",
           "FLOW_KINDS"]
