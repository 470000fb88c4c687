"""Exports of a trained diffusion model: a LoRA that diffusers' ``pipe.load_lora_weights(dir)`` reads, or a
full pipeline folder; PPD's user branch; a short model card.

LoRA files follow the diffusers training scripts per family: SD / SDXL save the UNet's peft state dict
converted to diffusers keys (``unet_lora_layers``), SD3 / Flux save the transformer's peft state dict
(``transformer_lora_layers``), each through the family pipeline's own ``save_lora_weights`` -- with the
adapter's peft config as metadata (``unet_lora_adapter_metadata`` / ``transformer_lora_adapter_metadata``,
as diffusers' ``training_utils._collate_lora_metadata`` does), so ``load_lora_weights`` restores ``lora_alpha``
and a LoRA trained with alpha != r loads at the strength it was trained at.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from .families import Family
from .models import Components
from .users import UserAttnProcessor


def save_lora(comp: Components, family: Family, denoiser, out: Path):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(denoiser)
    if not family.flow:
        layers = convert_state_dict_to_diffusers(layers)
    pipe_cls = type(comp.pipeline(denoiser))
    metadata = family.lora_argument.replace("_layers", "_adapter_metadata")  # e.g. unet_lora_adapter_metadata
    pipe_cls.save_lora_weights(str(out), **{family.lora_argument: layers,
                                            metadata: denoiser.peft_config["default"].to_dict()})


def save_full(comp: Components, denoiser, out: Path):
    comp.pipeline(denoiser).save_pretrained(str(out))
    comp.noise_scheduler.save_pretrained(str(out / "scheduler"))  # the training schedule, not the sampler


def save_user_branch(denoiser, user_emb: dict, n_tokens: int, scale: float, out: Path):
    """PPD: the user branch weights and the user embeddings (``users.load_user_branch`` reads them back)."""

    state = {f"tokens.{k}": v for k, v in denoiser.user_tokens.state_dict().items()}
    for name, proc in denoiser.attn_processors.items():
        if isinstance(proc, UserAttnProcessor):
            state.update({f"attn.{name}.{k}": v for k, v in proc.state_dict().items()})
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / "user_branch.safetensors"))
    save_file({f"user.{u}": e.contiguous() for u, e in user_emb.items()}, str(out / "user_embeddings.safetensors"))
    (out / "user_branch.json").write_text(json.dumps({"n_tokens": n_tokens, "scale": scale, "users": sorted(user_emb)}))


@dataclass(kw_only=True)
class ModelCard:
    """How an exported model was made, as its README says it (built by the recipe from its config:
    ``DiffusionRecipe.model_card``)."""

    base: str  # the base model's name or path
    kind: str  # sd / sdxl / sd3 / flux
    lora: bool
    loss: str
    data: Optional[str]
    resolution: int
    beta: Optional[float]
    steps: int
    batch_size: int
    grad_accum: int
    reference: str
    optimizer: str
    lr: float
    scale_lr: bool

    def write(self, out: Path, metrics: dict):
        """``out/README.md``: a diffusers model card (YAML header, what was trained on what, metrics, use)."""
        kind = "LoRA adapter" if self.lora else f"full {'transformer' if self.kind in ('sd3', 'flux') else 'UNet'} fine-tune"
        lines = [
            "---", "library_name: diffusers", "tags: [mmalign, diffusion-dpo, text-to-image]", "---", "",
            f"# {self.loss} fine-tune of {self.base}", "",
            f"A {kind} trained with mmalign's `{self.loss}` preference loss (Diffusion-DPO, Wallace et al. 2023).", "",
            f"- base model: `{self.base}` ({self.kind})",
            f"- data: `{self.data}` at {self.resolution}px",
            f"- beta: {self.beta} (Salesforce convention), steps: {self.steps}, "
            f"global batch: {self.batch_size} x {self.grad_accum} x processes",
            f"- reference: {self.reference}, optimizer: {self.optimizer}, lr: {self.lr} "
            f"(scale_lr={self.scale_lr})",
        ]
        if metrics:
            lines += ["", "## Metrics", ""] + [f"- {k}: {v}" for k, v in metrics.items()]
        if self.lora:
            lines += ["", "## Use", "", "```python", "pipe.load_lora_weights(PATH_TO_THIS_FOLDER)", "```"]
        (out / "README.md").write_text("\n".join(lines) + "\n")


@torch.no_grad()
def export(out_dir, comp: Components, family: Family, denoiser, card: ModelCard, ema=None,
           user_branch: Optional[tuple[int, float]] = None, user_emb: dict | None = None, metrics: dict | None = None):
    """LoRA (``card.lora``) -> ``pytorch_lora_weights.safetensors``; full -> a diffusers pipeline folder (EMA weights
    when EMA is on); PPD (``user_branch`` = (tokens, scale)) adds its user branch. Plus the model card."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = [p for p in denoiser.parameters() if p.requires_grad]
    if ema is not None:
        ema.store(params)
        ema.copy_to(params)
    try:
        if user_branch is not None:
            save_user_branch(denoiser, user_emb or {}, *user_branch, out)
        if card.lora:
            save_lora(comp, family, denoiser, out)
        else:
            save_full(comp, denoiser, out)
    finally:
        if ema is not None:
            ema.restore(params)
    card.write(out, metrics or {})
