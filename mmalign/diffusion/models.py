"""Stable Diffusion components: loaded from a hub id / local folder, or built tiny from configs.

``kind`` is ``"sd"`` (SD 1.x / 2.x: one CLIP text encoder; SD 2.1 is v-prediction, read from the
scheduler config) or ``"sdxl"`` (two text encoders, pooled embeddings, ``add_time_ids``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmalign.paths import ASSETS, resolve

TINY_CLIP_TOKENIZER = ASSETS / "tokenizers" / "tiny-clip-bpe"


@dataclass
class Components:
    kind: str
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # DDPMScheduler with the model's training schedule
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    extra: dict = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def frozen_modules(self):
        return [m for m in (self.vae, self.text_encoder, self.text_encoder_2) if m is not None]

    def pipeline(self, unet=None, scheduler: str = "ddim"):
        """A diffusers pipeline around these components (for sampling, validation and export)."""
        from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        sched_cls = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}[scheduler]
        extra = {"steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False} if scheduler == "ddim" else {}
        sched = sched_cls.from_config(self.noise_scheduler.config, **extra)
        unet = unet if unet is not None else self.unet
        if self.kind == "sdxl":
            pipe = StableDiffusionXLPipeline(vae=self.vae, text_encoder=self.text_encoder,
                                             text_encoder_2=self.text_encoder_2, tokenizer=self.tokenizer,
                                             tokenizer_2=self.tokenizer_2, unet=unet, scheduler=sched)
        else:
            pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                           unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                           requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def load_components(kind: str, name_or_path: str, vae: str | None = None, prediction_type: str = "auto",
                    dtype: torch.dtype = torch.float32) -> Components:
    """Load from a diffusers pipeline folder or hub id (``runwayml``-style layout: unet/, vae/,
    text_encoder/, tokenizer/, scheduler/ [+ text_encoder_2/, tokenizer_2/ for SDXL]).
    ``vae``: an alternative VAE (e.g. ``madebyollin/sdxl-vae-fp16-fix``). Frozen parts get ``dtype``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    path = resolve(name_or_path)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    if vae:
        vae_model = AutoencoderKL.from_pretrained(resolve(vae), subfolder="vae" if Path(resolve(vae), "vae").is_dir() else None)
    else:
        vae_model = AutoencoderKL.from_pretrained(path, subfolder="vae")
    tok = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
    sched = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    if prediction_type != "auto":
        sched.register_to_config(prediction_type=prediction_type)
    comp = Components(kind, unet, vae_model if dtype == torch.float32 else vae_model.to(dtype), te, tok, sched)
    if kind == "sdxl":
        comp.tokenizer_2 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2")
        comp.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype)
    elif kind != "sd":
        raise ValueError(f"unknown model kind {kind!r}; use 'sd' (1.x/2.x) or 'sdxl'")
    return comp


def tiny_components(kind: str = "sd", seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 16,
                    **unet_overrides) -> Components:
    """Random-weight components at test size, built from the real diffusers/transformers classes.
    ``sample_size`` is the latent size (images are 2x larger: the tiny VAE has 2 blocks)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(TINY_CLIP_TOKENIZER))
    te_cfg = CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, hidden_size=32, intermediate_size=37,
                            num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tok),
                            max_position_embeddings=tok.model_max_length, hidden_act="gelu", projection_dim=32)
    te = CLIPTextModel(te_cfg)
    unet_kw = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=sample_size, in_channels=4,
                   out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                   up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                   attention_head_dim=8, norm_num_groups=32)
    te2 = None
    if kind == "sdxl":
        te2 = CLIPTextModelWithProjection(te_cfg)
        unet_kw.update(cross_attention_dim=64, use_linear_projection=True, addition_embed_type="text_time",
                       addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
                       transformer_layers_per_block=(1, 1), attention_head_dim=(2, 4))
    elif kind != "sd":
        raise ValueError(f"unknown model kind {kind!r}")
    unet_kw.update(unet_overrides)
    unet = UNet2DConditionModel(**unet_kw)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=32, sample_size=sample_size * 2)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type=prediction_type, num_train_timesteps=1000, steps_offset=1,
                          clip_sample=False)
    return Components(kind, unet, vae, te, tok, sched, text_encoder_2=te2, tokenizer_2=tok if kind == "sdxl" else None)


def save_components(comp: Components, path: str | Path):
    """Write a diffusers pipeline folder that ``load_components`` (and diffusers) can read back."""
    comp.pipeline().save_pretrained(str(path))
    comp.noise_scheduler.save_pretrained(str(Path(path) / "scheduler"))  # keep the DDPM training schedule
