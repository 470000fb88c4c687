"""Samplers that record what group RL trains on, for every family.

Step functions (pure, fp32, per-dimension *mean* log-densities as every peer computes them):

* ``flow_sde_step`` -- Flow-GRPO's reverse SDE for rectified flow (Liu et al. 2025, arXiv 2505.05470, Eq. 4;
  flow_grpo ``sde_step_with_logprob``): sigma_t = a sqrt(sigma / (1 - sigma)) (the first sigma of a schedule
  starting at 1 uses the next sigma in the denominator), Delta = sigma - sigma_next,
  mu = x (1 - sigma_t^2 Delta / (2 sigma)) - v (1 + sigma_t^2 (1 - sigma) / (2 sigma)) Delta, s = sigma_t sqrt(Delta),
  x_next ~ N(mu, s^2 I).
* ``ddim_step`` -- DDIM with eta > 0 (Song et al. 2021, Eq. 12; DDPO ``ddim_step_with_logprob``) for epsilon- and
  v-prediction UNets: x0_hat, eps_hat from the prediction, s^2 = eta^2 (1 - abar') / (1 - abar) (1 - abar / abar'),
  mu = sqrt(abar') x0_hat + sqrt(1 - abar' - s^2) eps_hat.

``StepSampler.sample`` runs the family's sampler in our own loop -- the flow-matching Euler ODE (SD3 / Flux) or
deterministic DDIM (UNets), with the stochastic step (``noise_level`` a / ``eta``) on a window of steps (all of
them: Flow-GRPO; 1-2: Flow-GRPO-Fast) -- with classifier-free guidance ([uncond; cond] in one forward, the
pipeline's own negative embeddings) and keeps the final latents and, for the window, (x_i, x_{i+1}, log p).
Without a window it is the diffusers pipeline's sampler (tested equal to ``pipe(..., output_type="latent")``).
Each image draws its initial latent and its step noise from its own generator, so a batch reproduces on any
number of processes. Rollouts run in the module's train mode (dropout 0), as training recomputes them: the
importance ratio is then exactly 1 before the first update (tested in fp32 on CPU).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .families import Cond, Family

Tensor = torch.Tensor
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _col(v, like: Tensor) -> Tensor:
    """A scalar or [N] schedule value as [N, 1, 1, 1] fp32 on ``like``'s device."""
    return torch.as_tensor(v, dtype=torch.float32, device=like.device).reshape(-1, *[1] * (like.dim() - 1))


def gaussian_logp(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Per sample, the mean over C, H, W of log N(x; mean, std^2) (fp32; ``x`` carries no gradient)."""
    x, mean = x.detach().float(), mean.float()
    lp = -((x - mean) ** 2) / (2 * std ** 2) - torch.log(std) - HALF_LOG_2PI
    return lp.mean(dim=tuple(range(1, lp.dim())))


def flow_sde_step(x: Tensor, v: Tensor, sigma, sigma_next, noise_level: float, sigma_1: float,
                  noise: Tensor | None = None, x_next: Tensor | None = None):
    """One Flow-GRPO SDE step (see the module docstring). ``sigma_1``: the schedule's second sigma, used in the
    denominator where sigma == 1. Returns (x_next, logp [N], mu, sigma_t); pass ``x_next`` to score a given one."""
    x, v = x.float(), v.float()
    s, s_next = _col(sigma, x), _col(sigma_next, x)
    dt = s_next - s  # < 0
    sigma_t = torch.sqrt(s / (1 - torch.where(s == 1, torch.full_like(s, sigma_1), s))) * noise_level
    mean = x * (1 + sigma_t ** 2 / (2 * s) * dt) + v * (1 + sigma_t ** 2 * (1 - s) / (2 * s)) * dt
    std = sigma_t * torch.sqrt(-dt)
    if x_next is None:
        x_next = mean + std * noise.float()
    return x_next, gaussian_logp(x_next, mean, std), mean, sigma_t


def ddim_step(x: Tensor, pred: Tensor, abar, abar_prev, eta: float, prediction_type: str = "epsilon",
              noise: Tensor | None = None, x_next: Tensor | None = None):
    """One DDIM step with eta (see the module docstring); ``abar`` / ``abar_prev`` the cumulative alphas at t and at
    the previous timestep. Returns (x_next, logp [N] or None when eta = 0, mu, std)."""
    x, pred = x.float(), pred.float()
    a, a_prev = _col(abar, x), _col(abar_prev, x)
    b = 1 - a
    if prediction_type == "epsilon":
        x0, eps = (x - b.sqrt() * pred) / a.sqrt(), pred
    elif prediction_type == "v_prediction":
        x0, eps = a.sqrt() * x - b.sqrt() * pred, a.sqrt() * pred + b.sqrt() * x
    else:
        raise ValueError(f"ddim_step: prediction_type {prediction_type!r} (epsilon or v_prediction)")
    var = (1 - a_prev) / b * (1 - a / a_prev)
    std = eta * var.clamp(min=0).sqrt()
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std ** 2).clamp(min=0).sqrt() * eps
    if eta == 0:
        return (mean if x_next is None else x_next), None, mean, std
    if x_next is None:
        x_next = mean + std * noise.float()
    return x_next, gaussian_logp(x_next, mean, std), mean, std


@dataclass
class Rollout:
    """What a sampling call keeps: final latents [N, C, h, w] and, for the stochastic window, the step indices,
    the latents before and after each window step [N, W, C, h, w] and their log-probs [N, W] (all fp32, CPU)."""

    final: Tensor
    window: list
    x: Tensor | None = None
    x_next: Tensor | None = None
    logp: Tensor | None = None


class StepSampler:
    """The family's sampler, step by step (see the module docstring)."""

    def __init__(self, family: Family, comp, steps: int, guidance: float, resolution: int, vae_scale_factor: int,
                 noise_level: float = 0.7, eta: float = 1.0):
        """``guidance``: the classifier-free guidance scale (Flux: no negative branch; its guidance embedding is the
        family's ``flow.guidance``, as in training)."""
        import diffusers

        self.family, self.comp, self.n, self.guidance, self.res = family, comp, steps, guidance, resolution
        self.noise_level, self.eta = noise_level, eta
        h = resolution // vae_scale_factor
        self.shape = (comp.denoiser.config.in_channels // (4 if family.kind == "flux" else 1), h, h)
        if family.flow:
            sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(comp.noise_scheduler.config)
            kw = {}
            if family.kind == "flux":  # FluxPipeline: linear sigmas, shifted by mu from the image sequence length
                from diffusers.pipelines.flux.pipeline_flux import calculate_shift

                c = sched.config
                kw = {"sigmas": np.linspace(1.0, 1 / steps, steps),
                      "mu": calculate_shift((h // 2) ** 2, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                            c.get("base_shift", 0.5), c.get("max_shift", 1.15))}
            sched.set_timesteps(steps, **kw)
            self.sigmas = sched.sigmas.float().cpu()  # n + 1, ending at 0
        else:
            sched = diffusers.DDIMScheduler.from_config(comp.noise_scheduler.config, steps_offset=1, clip_sample=False,
                                                        set_alpha_to_one=False)
            sched.set_timesteps(steps)
            self.timesteps = sched.timesteps.cpu()
            ac = sched.alphas_cumprod.float()
            prev = self.timesteps - sched.config.num_train_timesteps // steps
            self.abar = ac[self.timesteps]
            self.abar_prev = torch.where(prev >= 0, ac[prev.clamp(min=0)], torch.full_like(self.abar, float(sched.final_alpha_cumprod)))
            self.prediction_type = sched.config.prediction_type
        self.scheduler = sched

    def t(self, i: int) -> Tensor:
        """The model's time input at step i: sigma (flow families scale it themselves) or the DDIM timestep."""
        return self.sigmas[i] if self.family.flow else self.timesteps[i]

    def times(self) -> Tensor:
        """The model's time input of every step [n]."""
        return self.sigmas[: self.n] if self.family.flow else self.timesteps

    def score(self, x: Tensor, pred: Tensor, steps: Tensor, x_next: Tensor):
        """Per row, the stochastic step ``steps[row]`` from ``x`` with ``pred`` scored at the drawn ``x_next``:
        (logp [N], mu, the step's noise scale for the KL: flow sigma_t (flow_grpo's KL divides by it, not by
        sigma_t^2 Delta), DDIM std)."""
        s = steps.cpu().long()
        if self.family.flow:
            _, lp, mean, sigma_t = flow_sde_step(x, pred, self.sigmas[s], self.sigmas[s + 1], self.noise_level,
                                                 float(self.sigmas[1]), x_next=x_next)
            return lp, mean, sigma_t
        _, lp, mean, std = ddim_step(x, pred, self.abar[s], self.abar_prev[s], self.eta, self.prediction_type,
                                     x_next=x_next)
        return lp, mean, std

    def condition(self, pipe, prompts: list[str], device) -> tuple[Cond, Cond | None]:
        """(cond, uncond) from the pipeline's ``encode_prompt`` with guidance (its own negative embeddings: SDXL's
        zeros for an empty negative prompt); Flux has no negative branch (guidance-distilled)."""
        return self.family.encode_guided(pipe, prompts, device, self.guidance > 1, self.res)

    def predict(self, model, x: Tensor, i, cond: Cond, uncond: Cond | None, both: Cond | None = None) -> Tensor:
        """The guided prediction at step ``i`` (an index, or one per row [N]) for latents ``x`` [N, C, h, w] (one
        forward of [uncond; cond]; ``both``: that concatenation, built once per sampling call)."""
        t = (self.t(i) if isinstance(i, int) else self.times()[i]).to(x.device).expand(len(x))
        if uncond is None:
            return self.family.predict(model, x, t.to(x.dtype) if self.family.flow else t, cond).float()
        out = self.family.predict(model, torch.cat([x, x]), torch.cat([t, t]).to(x.dtype) if self.family.flow
                                  else torch.cat([t, t]), both if both is not None else uncond.cat(cond)).float()
        u, c = out.chunk(2)
        return u + self.guidance * (c - u)

    def step(self, x: Tensor, pred: Tensor, i: int, stochastic: bool, noise: Tensor | None = None,
             x_next: Tensor | None = None):
        """(x_next, logp or None, mu, std) of step ``i`` (the ODE step when not ``stochastic``)."""
        if self.family.flow:
            if not stochastic:
                return x.float() + (self.sigmas[i + 1] - self.sigmas[i]) * pred, None, None, None
            return flow_sde_step(x, pred, self.sigmas[i], self.sigmas[i + 1], self.noise_level, float(self.sigmas[1]),
                                 noise, x_next)
        return ddim_step(x, pred, self.abar[i], self.abar_prev[i], self.eta if stochastic else 0.0,
                         self.prediction_type, noise, x_next)

    @torch.no_grad()
    def sample(self, model, pipe, prompts: list[str], seeds: list[int], window=(), device="cpu") -> Rollout:
        """One image per (prompt, seed): initial latents and window noise from ``torch.Generator().manual_seed(seed)``
        (the pipeline's own draw for the initial latents: ``randn`` of the unpacked shape)."""
        window = sorted(set(window))
        if window and (window[-1] >= self.n - (1 if self.family.flow else 0) or window[0] < 0):
            raise ValueError(f"the stochastic window {window} must lie in steps 0..{self.n - 2 if self.family.flow else self.n - 1}"
                             " (the last flow step's noise level is ~0: its log-density is not usable)")
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
        x = torch.stack([torch.randn(self.shape, generator=g) for g in gens]).to(device)  # the pipelines' draw
        cond, uncond = self.condition(pipe, prompts, device)
        both = uncond.cat(cond) if uncond is not None else None
        xs, xn, lps = [], [], []
        for i in range(self.n):
            pred = self.predict(model, x, i, cond, uncond, both)
            if i in window:
                noise = torch.stack([torch.randn(self.shape, generator=g) for g in gens]).to(device)
                nxt, lp, _, _ = self.step(x, pred, i, True, noise)
                xs.append(x.float().cpu())
                xn.append(nxt.float().cpu())
                lps.append(lp.cpu())
            else:
                nxt = self.step(x, pred, i, False)[0]
            x = nxt.to(x.dtype)
        out = Rollout(x.float().cpu(), window)
        if window:
            out.x, out.x_next, out.logp = torch.stack(xs, 1), torch.stack(xn, 1), torch.stack(lps, 1)
        return out


__all__ = ["flow_sde_step", "ddim_step", "gaussian_logp", "StepSampler", "Rollout"]
