"""Diffusion modality adapter: per-sample denoising scores for the shared loss core.

score(x0 | c) = -mean_{C,H,W} (model(x_t, t, c) - target)^2, target = eps (epsilon prediction) or
v = sqrt(abar) eps - sqrt(1 - abar) x0 (v-prediction, SD 2.1). Winner and loser of a pair share t and
the noise (Diffusion-DPO, Wallace et al. 2023, arXiv 2311.12908, Eq. 14) and go through the UNet in
one forward of 2B samples, winners first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

Tensor = torch.Tensor


@dataclass
class Cond:
    """Text conditioning for B samples; ``pooled``/``time_ids`` only for SDXL."""

    embeds: Tensor  # [B, T, D]
    pooled: Optional[Tensor] = None  # [B, D2]
    time_ids: Optional[Tensor] = None  # [B, 6]

    def cat(self, other: "Cond") -> "Cond":
        def c(a, b):
            return None if a is None else torch.cat([a, b])

        return Cond(c(self.embeds, other.embeds), c(self.pooled, other.pooled), c(self.time_ids, other.time_ids))

    def unet_kwargs(self) -> dict:
        kw = {"encoder_hidden_states": self.embeds}
        if self.pooled is not None:
            kw["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kw


def sdxl_time_ids(original_size: Tensor, crop_top_left: Tensor, resolution: int) -> Tensor:
    """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample."""
    target = torch.full_like(original_size, float(resolution))
    return torch.cat([original_size, crop_top_left, target], dim=1)


@torch.no_grad()
def encode_prompts(pipe, prompts: list[str], device, kind: str, original_size=None, crop_top_left=None,
                   resolution: int | None = None) -> Cond:
    """The pipeline's own ``encode_prompt``, so training sees exactly the conditioning inference uses."""
    if kind == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        ids = sdxl_time_ids(original_size.to(device), crop_top_left.to(device), resolution).to(embeds.dtype)
        return Cond(embeds, pooled, ids)
    embeds, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return Cond(embeds)


def draw_noise(shape: tuple, generators: list[torch.Generator], num_train_timesteps: int, device,
               dtype=torch.float32, shared: bool = True) -> tuple[Tensor, Tensor]:
    """Noise and t ~ U{0..T-1} per pair, from that pair's own generator (so they do not depend on batch
    composition, process count or resume). ``shared``: one draw for both images ([B, ...], [B]);
    otherwise one per image ([B, 2, ...], [B, 2]), as RPO does."""
    k = () if shared else (2,)
    noise = torch.stack([torch.randn(k + tuple(shape), generator=g) for g in generators]).to(device, dtype)
    t = torch.stack([torch.randint(0, num_train_timesteps, k or (1,), generator=g) for g in generators])
    return noise, (t[:, 0] if shared else t).to(device)


def noisy_and_target(scheduler, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    x_t = scheduler.add_noise(x0, noise, t)
    pt = scheduler.config.prediction_type
    if pt == "epsilon":
        return x_t, noise
    if pt == "v_prediction":
        return x_t, scheduler.get_velocity(x0, noise, t)
    raise ValueError(f"unsupported prediction_type {pt!r} (epsilon or v_prediction)")


def pair_mse(unet, scheduler, x0: Tensor, noise: Tensor, t: Tensor, cond: Cond,
             xt_target: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """x0 ``[B, 2, C, h, w]`` (winner, loser); noise ``[B, C, h, w]`` and t ``[B]`` shared by the pair;
    ``cond`` for 2B samples (winners first). ``xt_target``: precomputed (x_t, target) for the 2B samples
    (DDIM-InPO's inverted latents and re-derived noise). Returns per-sample MSE ``[2B]`` (fp32)."""
    b = x0.shape[0]
    per_image = t.dim() == 2  # independent noise and t for each image of the pair
    tt = torch.cat([t[:, 0], t[:, 1]]) if per_image else torch.cat([t, t])
    if xt_target is None:
        x = torch.cat([x0[:, 0], x0[:, 1]])
        n = torch.cat([noise[:, 0], noise[:, 1]]) if per_image else torch.cat([noise, noise])
        x_t, target = noisy_and_target(scheduler, x, n, tt)
    else:
        x_t, target = xt_target
    if cond.embeds.shape[0] != 2 * b:
        raise ValueError(f"conditioning has {cond.embeds.shape[0]} rows, expected {2 * b}")
    pred = unet(x_t, tt, **cond.unet_kwargs()).sample
    return ((pred.float() - target.float()) ** 2).mean(dim=(1, 2, 3))
