"""Loading a text-to-image model for sampling: its family from ``model_index.json`` (``detect_kind``) and its
diffusers pipeline with an optional LoRA that must fit the base (``load_pipeline``). The sampling loop and
sampled folders live in ``mmalign.eval.sampling``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mmalign.data.records import DataError
from mmalign.paths import LORA_FILE, resolve

from .models import FLOW_KINDS, load_components

PIPELINE_KINDS = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
                  "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}


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


__all__ = ["detect_kind", "load_pipeline", "apply_lora", "FLOW_KINDS", "LORA_FILE"]
