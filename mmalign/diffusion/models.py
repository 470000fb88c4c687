"""Text-to-image components per model family: loaded from a hub id / local folder, or built tiny from configs.

``kind`` picks the family (``mmalign.diffusion.families.FAMILIES``):

* ``sd``   SD 1.x / 2.x: ``UNet2DConditionModel``, one CLIP text encoder (SD 2.1 is v-prediction, read from
  the scheduler config)
* ``sdxl`` two CLIP text encoders, pooled embeddings, ``add_time_ids`` micro-conditioning
* ``sd3``  SD3 / SD3.5: ``SD3Transformer2DModel``, two CLIP encoders + T5, pooled projections, flow matching
* ``flux`` FLUX.1: ``FluxTransformer2DModel``, CLIP (pooled) + T5, packed 2x2 latents, guidance embedding
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mmalign.paths import ASSETS, resolve

TINY_CLIP_TOKENIZER = ASSETS / "tokenizers" / "tiny-clip-bpe"
TINY_T5_TOKENIZER = ASSETS / "tokenizers" / "tiny-t5-bpe"
KINDS = ("sd", "sdxl", "sd3", "flux")
FLOW_KINDS = ("sd3", "flux")


@dataclass
class Components:
    kind: str
    denoiser: Any  # UNet2DConditionModel (sd, sdxl) or the flow transformer (sd3, flux)
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any  # the training schedule: DDPMScheduler (sd, sdxl) or FlowMatchEulerDiscreteScheduler
    text_encoder_2: Any = None
    tokenizer_2: Any = None
    text_encoder_3: Any = None  # SD3's T5
    tokenizer_3: Any = None
    extra: dict = field(default_factory=dict)
    loader: Callable[[], dict] | None = None
    """reads the frozen modules (VAE, text encoders) from disk again: ``load_frozen`` / ``release_frozen``"""

    @property
    def unet(self):
        """The denoiser, under the name the SD code and diffusers' SD pipelines use."""
        return self.denoiser

    @property
    def flow(self) -> bool:
        return self.kind in FLOW_KINDS

    @property
    def prediction_type(self) -> str:
        return "flow" if self.flow else self.noise_scheduler.config.prediction_type

    def frozen_modules(self):
        return [m for m in (self.vae, self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]

    @property
    def frozen_loaded(self) -> bool:
        return self.vae is not None

    def load_frozen(self) -> list:
        """Read the VAE and text encoders if they were left on disk; returns the modules loaded now."""
        if self.frozen_loaded:
            return []
        if self.loader is None:
            raise RuntimeError("these components have no VAE / text encoders and no loader to read them")
        mods = self.loader()
        for k, m in mods.items():
            setattr(self, k, m)
        return list(mods.values())

    def release_frozen(self) -> bool:
        """Drop the VAE and text encoders (when a loader can read them again); True if they were dropped.
        A training step on cached latents and text never uses them: this frees their memory for training."""
        if self.loader is None or not self.frozen_loaded:
            return False
        self.vae = self.text_encoder = self.text_encoder_2 = self.text_encoder_3 = None
        gc.collect()
        return True

    def pipeline(self, denoiser=None, scheduler: str = "ddim"):
        """A diffusers pipeline around these components (sampling, validation, export, ``encode_prompt``)."""
        import diffusers

        d = denoiser if denoiser is not None else self.denoiser
        if self.flow:
            sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config)
            if self.kind == "sd3":
                pipe = diffusers.StableDiffusion3Pipeline(
                    transformer=d, scheduler=sched, vae=self.vae, text_encoder=self.text_encoder,
                    tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2,
                    text_encoder_3=self.text_encoder_3, tokenizer_3=self.tokenizer_3)
            else:
                pipe = diffusers.FluxPipeline(scheduler=sched, vae=self.vae, text_encoder=self.text_encoder,
                                              tokenizer=self.tokenizer, text_encoder_2=self.text_encoder_2,
                                              tokenizer_2=self.tokenizer_2, transformer=d)
        else:
            sched_cls = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler}[scheduler]
            extra = {"steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False} if scheduler == "ddim" else {}
            sched = sched_cls.from_config(self.noise_scheduler.config, **extra)
            if self.kind == "sdxl":
                pipe = diffusers.StableDiffusionXLPipeline(
                    vae=self.vae, text_encoder=self.text_encoder, text_encoder_2=self.text_encoder_2,
                    tokenizer=self.tokenizer, tokenizer_2=self.tokenizer_2, unet=d, scheduler=sched)
            else:
                pipe = diffusers.StableDiffusionPipeline(
                    vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=d, scheduler=sched,
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def place_frozen(modules, device, dtype: torch.dtype):
    """Frozen (no grad, eval mode) on ``device``, in ``dtype`` unless fp32 (the VAE / text encoders)."""
    for mod in modules:
        mod.requires_grad_(False)
        mod.eval()
        mod.to(device) if dtype == torch.float32 else mod.to(device, dtype=dtype)


def _check_kind(kind: str):
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; use one of {list(KINDS)} (sd = SD 1.x/2.x)")


def load_components(kind: str, name_or_path: str, vae: str | None = None, prediction_type: str = "auto",
                    dtype: torch.dtype = torch.float32, frozen: bool = True) -> Components:
    """Load from a diffusers pipeline folder or hub id (unet/ or transformer/, vae/, text_encoder*/,
    tokenizer*/, scheduler/). ``vae``: an alternative VAE (e.g. ``madebyollin/sdxl-vae-fp16-fix``).
    Text encoders and the VAE get ``dtype``. ``frozen=False``: leave the VAE and text encoders on disk
    (``Components.load_frozen`` reads them when something needs them: caching, validation, a full export)."""
    import diffusers
    from transformers import AutoTokenizer

    _check_kind(kind)
    path = resolve(name_or_path)
    tok = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    tok2 = lambda sub: AutoTokenizer.from_pretrained(path, subfolder=sub)  # noqa: E731
    if kind in ("sd", "sdxl"):
        denoiser = diffusers.UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        sched = diffusers.DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        if prediction_type != "auto":
            sched.register_to_config(prediction_type=prediction_type)
    else:
        cls = diffusers.SD3Transformer2DModel if kind == "sd3" else diffusers.FluxTransformer2DModel
        denoiser = cls.from_pretrained(path, subfolder="transformer")
        sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    comp = Components(kind, denoiser, None, None, tok, sched)
    if kind in ("sdxl", "sd3", "flux"):
        comp.tokenizer_2 = tok2("tokenizer_2")
    if kind == "sd3" and (Path(path, "text_encoder_3").is_dir() or not Path(path).exists()):
        comp.tokenizer_3 = tok2("tokenizer_3")
    comp.loader = lambda: _load_frozen(kind, path, vae, dtype, comp.tokenizer_3 is not None)
    if frozen:
        comp.load_frozen()
    return comp


def _load_frozen(kind: str, path: str, vae: str | None, dtype: torch.dtype, t5: bool) -> dict:
    """The VAE and text encoders of a pipeline folder / hub id (``load_components``)."""
    import diffusers
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    if vae:
        vp = resolve(vae)
        vae_model = diffusers.AutoencoderKL.from_pretrained(vp, subfolder="vae" if Path(vp, "vae").is_dir() else None)
    else:
        vae_model = diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae")
    out = {"vae": vae_model if dtype == torch.float32 else vae_model.to(dtype)}
    load = lambda cls, sub: cls.from_pretrained(path, subfolder=sub, dtype=dtype)  # noqa: E731
    if kind in ("sd", "sdxl"):
        out["text_encoder"] = load(CLIPTextModel, "text_encoder")
        if kind == "sdxl":
            out["text_encoder_2"] = load(CLIPTextModelWithProjection, "text_encoder_2")
    elif kind == "sd3":
        out["text_encoder"] = load(CLIPTextModelWithProjection, "text_encoder")
        out["text_encoder_2"] = load(CLIPTextModelWithProjection, "text_encoder_2")
        if t5:
            out["text_encoder_3"] = load(T5EncoderModel, "text_encoder_3")
    else:
        out["text_encoder"] = load(CLIPTextModel, "text_encoder")
        out["text_encoder_2"] = load(T5EncoderModel, "text_encoder_2")
    return out


def _tiny_vae(latent_channels: int, sample_size: int, flow: bool):
    from diffusers import AutoencoderKL

    kw = dict(block_out_channels=(32, 64), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels, norm_num_groups=32,
              sample_size=sample_size * 2)
    if flow:  # SD3 / Flux VAEs: latents are (z - shift_factor) * scaling_factor, no quant convs
        kw.update(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    return AutoencoderKL(**kw)


def tiny_components(kind: str = "sd", seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 16,
                    **model_overrides) -> Components:
    """Random-weight components at test size, built from the real diffusers/transformers classes.
    ``sample_size`` is the latent size (images are 2x larger: the tiny VAE has 2 blocks)."""
    from diffusers import (
        DDPMScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )
    from transformers import (
        AutoTokenizer,
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    _check_kind(kind)
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(TINY_CLIP_TOKENIZER))
    te_cfg = CLIPTextConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, hidden_size=32, intermediate_size=37,
                            num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tok),
                            max_position_embeddings=tok.model_max_length, hidden_act="gelu", projection_dim=32)
    if kind in ("sd", "sdxl"):
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
        unet_kw.update(model_overrides)
        unet = UNet2DConditionModel(**unet_kw)
        vae = _tiny_vae(4, sample_size, flow=False)
        sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              prediction_type=prediction_type, num_train_timesteps=1000, steps_offset=1,
                              clip_sample=False)
        return Components(kind, unet, vae, te, tok, sched, text_encoder_2=te2, tokenizer_2=tok if kind == "sdxl" else None)
    t5_tok = AutoTokenizer.from_pretrained(str(TINY_T5_TOKENIZER))
    t5 = lambda d: T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=d, d_kv=8, d_ff=37, num_layers=2,  # noqa: E731
                                           num_heads=4, pad_token_id=t5_tok.pad_token_id,
                                           eos_token_id=t5_tok.eos_token_id, decoder_start_token_id=t5_tok.pad_token_id))
    if kind == "sd3":  # clip hidden 32 x 2 encoders = 64 = T5 width = joint_attention_dim (the pipeline pads to it)
        te, te2, te3 = CLIPTextModelWithProjection(te_cfg), CLIPTextModelWithProjection(te_cfg), t5(64)
        kw = dict(sample_size=sample_size, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                  num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64,
                  out_channels=4, pos_embed_max_size=max(16, sample_size))
        kw.update(model_overrides)
        tr = SD3Transformer2DModel(**kw)
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)  # SD3 / SD3.5's config
        return Components(kind, tr, _tiny_vae(4, sample_size, flow=True), te, tok, sched, te2, tok, te3, t5_tok)
    te, te2 = CLIPTextModel(te_cfg), t5(32)
    kw = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
              axes_dims_rope=(4, 4, 8))
    kw.update(model_overrides)
    tr = FluxTransformer2DModel(**kw)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                            base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                            max_image_seq_len=4096)  # FLUX.1-dev's config
    return Components(kind, tr, _tiny_vae(4, sample_size, flow=True), te, tok, sched, te2, t5_tok)


def save_components(comp: Components, path: str | Path):
    """Write a diffusers pipeline folder that ``load_components`` (and diffusers) can read back."""
    comp.pipeline().save_pretrained(str(path))
    comp.noise_scheduler.save_pretrained(str(Path(path) / "scheduler"))  # keep the training schedule
