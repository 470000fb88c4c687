"""Model families of the diffusion engine: conditioning, latents, noise draws and per-sample scores.

One recipe (``mmalign.train.diffusion``) drives every family through this interface; a family turns a
batch of (winner, loser) latents, their conditioning and one shared noise/t draw per pair into
per-sample scores ``-mse(pred, target)`` for the loss core:

* ``UNetFamily`` (``sd``, ``sdxl``): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t ~ U{0..T-1}; target eps
  (epsilon prediction) or v = sqrt(abar) eps - sqrt(1 - abar) x0 (v-prediction, SD 2.1).
  Diffusion-DPO, Wallace et al. 2023, arXiv 2311.12908, Eq. 14.
* ``FlowFamily`` (``sd3``, ``flux``): rectified flow, x_t = (1 - sigma) x0 + sigma eps, target v = eps - x0
  (Esser et al. 2024, arXiv 2403.03206, Eq. 1-3, and the diffusers SD3 / Flux training scripts). sigma is
  read from the model's FlowMatchEulerDiscreteScheduler: u is drawn (``uniform``, ``logit_normal`` with
  mean/std, or ``mode`` with a scale -- SD3 paper Sec. 3.1), the index u * T selects
  ``scheduler.sigmas`` (the shifted schedule when the config has a static ``shift``; Flux's dynamic
  shifting is an inference-time rule, so training sees the unshifted sigmas, as in the diffusers Flux
  script). The transformer is called with timestep sigma * 1000 (SD3) or sigma (Flux, which scales by
  1000 inside), Flux with its guidance embedding, packed 2x2 latents and text / image position ids.

Winner and loser share the noise and t/sigma (``shared``) and go through the model in one forward of 2B
samples, winners first. Prompt embeddings come from the pipeline's own ``encode_prompt``, so training
sees exactly the conditioning inference uses.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from .models import Components

Tensor = torch.Tensor

# Diffusion-DPO's beta convention: the loss core receives 0.5 * beta, i.e.
#   loss = -log sigmoid(-0.5 beta ((mse_w - mse_l) - (ref_w - ref_l)))
# (Wallace et al. 2023, arXiv 2311.12908, Eq. 14 with the 1/2 of the Gaussian log-likelihood written out, as
# the Salesforce train.py and the diffusers SDXL script do; the diffusers SD1.5 script omits it, so its
# beta_dpo is half of ours). It is applied to every pairwise loss's ``beta``: for IPO, hinge etc. that
# keeps "beta" on the same scale as for DPO (their margin is 0.5 beta times the MSE-difference gap).
BETA_SCALE = 0.5


@dataclass
class Cond:
    """Conditioning for N samples. ``pooled``: SDXL text_embeds / SD3 & Flux pooled projections;
    ``time_ids``: SDXL micro-conditioning; ``txt_ids``: Flux text position ids (shared, [T, 3])."""

    embeds: Tensor  # [N, T, D]
    pooled: Optional[Tensor] = None  # [N, D2]
    time_ids: Optional[Tensor] = None  # [N, 6]
    txt_ids: Optional[Tensor] = None  # [T, 3]

    def cat(self, other: "Cond") -> "Cond":
        def c(a, b):
            return None if a is None else torch.cat([a, b])

        return Cond(c(self.embeds, other.embeds), c(self.pooled, other.pooled), c(self.time_ids, other.time_ids),
                    self.txt_ids)

    def float(self) -> "Cond":
        f = lambda x: None if x is None else x.float()  # noqa: E731
        return Cond(f(self.embeds), f(self.pooled), f(self.time_ids), f(self.txt_ids))

    def unet_kwargs(self) -> dict:
        kw = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kw

    def __len__(self):
        return self.embeds.shape[0]


def sdxl_time_ids(original_size: Tensor, crop_top_left: Tensor, resolution: int) -> Tensor:
    """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample."""
    target = torch.full_like(original_size, float(resolution))
    return torch.cat([original_size, crop_top_left, target], dim=1)


def _pair_view(x0: Tensor, noise: Tensor, t: Tensor):
    """[B, 2, ...] latents and shared ([B, ...], [B]) or per-image ([B, 2, ...], [B, 2]) draws -> 2B rows."""
    per_image = t.dim() == 2
    tt = torch.cat([t[:, 0], t[:, 1]]) if per_image else torch.cat([t, t])
    x = torch.cat([x0[:, 0], x0[:, 1]])
    n = torch.cat([noise[:, 0], noise[:, 1]]) if per_image else torch.cat([noise, noise])
    return x, n, tt


class Family:
    """What the recipe needs from a model family (see the module docstring)."""

    kind: str
    flow: bool = False
    lora_targets = ("to_k", "to_q", "to_v", "to_out.0")
    supports_inversion = False
    supports_user_branch = False
    lora_argument = "unet_lora_layers"  # the keyword of the pipeline's save_lora_weights

    def __init__(self, comp: Components, **options):
        self.comp = comp
        self.options = options

    # -- latents
    def latent_stats(self, vae, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """Pixels [N, 3, H, W] in [-1, 1] -> posterior (mean, std) in the model's latent space."""
        dist = vae.encode(pixels).latent_dist
        cfg = vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        return (dist.mean - shift) * cfg.scaling_factor, dist.std * cfg.scaling_factor

    # -- conditioning
    def encode_prompts(self, pipe, prompts: list[str], device) -> Cond:
        raise NotImplementedError

    def finish_cond(self, cond: Cond, original_size=None, crop_top_left=None, resolution=None) -> Cond:
        """Per-sample conditioning that is not text (SDXL time ids)."""
        return cond

    def encode_guided(self, pipe, prompts: list[str], device, guided: bool, resolution: int) -> tuple[Cond, Cond | None]:
        """(cond, uncond) as the family's pipeline samples: its ``encode_prompt`` with classifier-free guidance (the
        pipeline's own negative embeddings), SDXL time ids for an uncropped square image."""
        raise NotImplementedError

    # -- noise and scores
    def draw(self, shape: tuple, generators: list[torch.Generator], device, shared: bool = True):
        raise NotImplementedError

    def noisy_and_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def predict(self, model, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        raise NotImplementedError

    def x0_from(self, x_t: Tensor, pred: Tensor, t: Tensor) -> Tensor:
        """The clean sample a prediction implies at (x_t, t) -- linear in the prediction (DiffusionNFT's x0_hat)."""
        raise NotImplementedError

    def pair_mse(self, model, x0: Tensor, noise: Tensor, t: Tensor, cond: Cond,
                 xt_target: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x0 ``[B, 2, C, h, w]`` (winner, loser); noise/t shared by the pair (``[B, ...]``, ``[B]``) or per
        image (``[B, 2, ...]``, ``[B, 2]``); ``cond`` for 2B samples (winners first). ``xt_target``:
        precomputed (x_t, target) for the 2B samples (DDIM-InPO). Returns per-sample MSE ``[2B]`` (fp32)."""
        b = x0.shape[0]
        if len(cond) != 2 * b:
            raise ValueError(f"conditioning has {len(cond)} rows, expected {2 * b}")
        x, n, tt = _pair_view(x0, noise, t)
        x_t, target = self.noisy_and_target(x, n, tt) if xt_target is None else xt_target
        pred = self.predict(model, x_t, tt, cond)
        return ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.dim())))


class UNetFamily(Family):
    """SD 1.x / 2.x and SDXL UNets (epsilon or v-prediction)."""

    supports_inversion = True
    supports_user_branch = True

    def __init__(self, comp: Components, **options):
        super().__init__(comp, **options)
        self.kind = comp.kind
        self.scheduler = comp.noise_scheduler

    def encode_prompts(self, pipe, prompts: list[str], device) -> Cond:
        if self.kind == "sdxl":
            e, _, p, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                            do_classifier_free_guidance=False)
            return Cond(e, p)
        e, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        return Cond(e)

    def encode_guided(self, pipe, prompts: list[str], device, guided: bool, resolution: int):
        if self.kind == "sdxl":
            e, ne, p, np_ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                               do_classifier_free_guidance=guided)
            n = len(prompts)
            ids = sdxl_time_ids(torch.full((n, 2), float(resolution)), torch.zeros(n, 2), resolution).to(device, e.dtype)
            return Cond(e, p, ids), (Cond(ne, np_, ids) if guided else None)
        e, ne = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guided)
        return Cond(e), (Cond(ne) if guided else None)

    def finish_cond(self, cond: Cond, original_size=None, crop_top_left=None, resolution=None) -> Cond:
        if self.kind != "sdxl":
            return cond
        ids = sdxl_time_ids(original_size.to(cond.embeds.device), crop_top_left.to(cond.embeds.device), resolution)
        return replace(cond, time_ids=ids.to(cond.embeds.dtype))

    def draw(self, shape: tuple, generators: list[torch.Generator], device, shared: bool = True):
        """Noise and t ~ U{0..T-1} per pair from that pair's own generator (independent of batch composition,
        process count and resume). ``shared``: one draw for both images; else one per image (RPO)."""
        k = () if shared else (2,)
        noise = torch.stack([torch.randn(k + tuple(shape), generator=g) for g in generators]).to(device)
        n_t = self.scheduler.config.num_train_timesteps
        t = torch.stack([torch.randint(0, n_t, k or (1,), generator=g) for g in generators])
        return noise, (t[:, 0] if shared else t).to(device)

    def noisy_and_target(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        x_t = self.scheduler.add_noise(x0, noise, t)
        pt = self.scheduler.config.prediction_type
        if pt == "epsilon":
            return x_t, noise
        if pt == "v_prediction":
            return x_t, self.scheduler.get_velocity(x0, noise, t)
        raise ValueError(f"unsupported prediction_type {pt!r} (epsilon or v_prediction)")

    def predict(self, model, x_t: Tensor, t: Tensor, cond: Cond) -> Tensor:
        return model(x_t, t, **cond.unet_kwargs()).sample

    def x0_from(self, x_t: Tensor, pred: Tensor, t: Tensor) -> Tensor:
        a = self.scheduler.alphas_cumprod.to(x_t.device)[t.long()].float().view(-1, *[1] * (x_t.dim() - 1))
        if self.scheduler.config.prediction_type == "v_prediction":
            return a.sqrt() * x_t - (1 - a).sqrt() * pred
        return (x_t - (1 - a).sqrt() * pred) / a.sqrt()


class FlowFamily(Family):
    """Rectified-flow transformers: SD3 / SD3.5 and FLUX.1 (see the module docstring)."""

    flow = True
    lora_argument = "transformer_lora_layers"

    def __init__(self, comp: Components, timestep_sampling: str = "logit_normal", logit_mean: float = 0.0,
                 logit_std: float = 1.0, mode_scale: float = 1.29, guidance: float = 3.5, max_sequence_length: int = 0):
        super().__init__(comp)
        self.kind = comp.kind
        self.scheduler = comp.noise_scheduler
        if timestep_sampling not in ("uniform", "logit_normal", "mode"):
            raise ValueError(f"timestep_sampling must be uniform, logit_normal or mode, got {timestep_sampling!r}")
        self.sampling, self.logit_mean, self.logit_std, self.mode_scale = (timestep_sampling, logit_mean, logit_std,
                                                                           mode_scale)
        self.guidance = guidance
        self.max_sequence_length = max_sequence_length or (512 if self.kind == "flux" else 256)
        # the training schedule: sigma_i for i = 0..T-1 (descending), timestep_i = sigma_i * T
        self.sigmas = self.scheduler.sigmas[: self.scheduler.config.num_train_timesteps].float().clone()

    def _t5_length(self) -> int:
        tok = self.comp.tokenizer_3 if self.kind == "sd3" else self.comp.tokenizer_2
        return min(self.max_sequence_length, getattr(tok, "model_max_length", self.max_sequence_length) or 10**6) \
            if tok is not None else self.max_sequence_length

    def encode_prompts(self, pipe, prompts: list[str], device) -> Cond:
        n = self._t5_length()
        if self.kind == "sd3":
            e, _, p, _ = pipe.encode_prompt(prompts, prompt_2=None, prompt_3=None, device=device, num_images_per_prompt=1,
                                            do_classifier_free_guidance=False, max_sequence_length=n)
            return Cond(e, p)
        e, p, ids = pipe.encode_prompt(prompts, prompt_2=None, device=device, num_images_per_prompt=1,
                                       max_sequence_length=n)
        return Cond(e, p, txt_ids=ids)

    def encode_guided(self, pipe, prompts: list[str], device, guided: bool, resolution: int):
        n = self._t5_length()
        if self.kind == "sd3":
            e, ne, p, np_ = pipe.encode_prompt(prompts, prompt_2=None, prompt_3=None, device=device,
                                               num_images_per_prompt=1, do_classifier_free_guidance=guided,
                                               max_sequence_length=n)
            return Cond(e, p), (Cond(ne, np_) if guided else None)
        e, p, ids = pipe.encode_prompt(prompts, prompt_2=None, device=device, num_images_per_prompt=1,
                                       max_sequence_length=n)
        return Cond(e, p, txt_ids=ids), None  # FLUX.1: guidance-distilled, no negative branch

    def sample_u(self, g: torch.Generator, k: int) -> Tensor:
        """u in [0, 1): uniform, logit-normal (sigmoid of N(mean, std)) or the SD3 paper's mode sampling (Esser et
        al. 2024, eqs. 19 and 20) -- diffusers' own ``compute_density_for_timestep_sampling``, fed the pair's
        generator so the draw stays keyed by (seed, step, row)."""
        from diffusers.training_utils import compute_density_for_timestep_sampling  # diffusers: loaded with the model

        return compute_density_for_timestep_sampling(self.sampling, k, self.logit_mean, self.logit_std,
                                                     self.mode_scale, device="cpu", generator=g)

    def draw(self, shape: tuple, generators: list[torch.Generator], device, shared: bool = True):
        """Noise and sigma per pair (or per image) from the pair's own generator; sigma is a float tensor."""
        k = () if shared else (2,)
        noise = torch.stack([torch.randn(k + tuple(shape), generator=g) for g in generators]).to(device)
        n_t = len(self.sigmas)
        u = torch.stack([self.sample_u(g, 2 if k else 1) for g in generators])
        idx = (u * n_t).long().clamp(0, n_t - 1)
        sigma = self.sigmas[idx]
        return noise, (sigma[:, 0] if shared else sigma).to(device)

    def noisy_and_target(self, x0: Tensor, noise: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        s = sigma.view(-1, *[1] * (x0.dim() - 1)).to(x0.dtype)
        return (1.0 - s) * x0 + s * noise, noise - x0

    def x0_from(self, x_t: Tensor, pred: Tensor, sigma: Tensor) -> Tensor:
        return x_t - sigma.view(-1, *[1] * (x_t.dim() - 1)).to(x_t.dtype) * pred

    def predict(self, model, x_t: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        if self.kind == "sd3":
            return model(hidden_states=x_t, timestep=sigma * self.scheduler.config.num_train_timesteps,
                         encoder_hidden_states=cond.embeds, pooled_projections=cond.pooled).sample
        n, c, h, w = x_t.shape
        packed = pack_latents(x_t)
        img_ids = latent_image_ids(h, w, x_t.device, x_t.dtype)
        unwrapped = getattr(model, "module", model)
        guidance = (torch.full((n,), self.guidance, device=x_t.device, dtype=x_t.dtype)
                    if unwrapped.config.guidance_embeds else None)
        out = model(hidden_states=packed, timestep=sigma, guidance=guidance, pooled_projections=cond.pooled,
                    encoder_hidden_states=cond.embeds, txt_ids=cond.txt_ids, img_ids=img_ids).sample
        return unpack_latents(out, h, w)


def pack_latents(x: Tensor) -> Tensor:
    """Flux packing: [N, C, h, w] -> [N, (h/2)(w/2), 4C], 2x2 patches (FluxPipeline._pack_latents' layout)."""
    n, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need even height and width, got {h}x{w}")
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """Inverse of ``pack_latents``: [N, (h/2)(w/2), 4C] -> [N, C, h, w]."""
    n, _, c4 = x.shape
    c = c4 // 4
    return x.view(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def latent_image_ids(h: int, w: int, device, dtype) -> Tensor:
    """Flux image position ids [(h/2)(w/2), 3]: (0, row, column) of each 2x2 patch."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


FAMILIES = {"sd": UNetFamily, "sdxl": UNetFamily, "sd3": FlowFamily, "flux": FlowFamily}


def family_for(comp: Components, **flow_options) -> Family:
    """The family object for ``comp.kind`` (flow options apply to sd3 / flux only)."""
    cls = FAMILIES[comp.kind]
    return cls(comp, **flow_options) if cls is FlowFamily else cls(comp)
