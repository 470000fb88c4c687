"""DDIM inversion for DDIM-InPO (Lu et al. 2025, arXiv 2503.18454, Sec. 4; JaydenLyh/InPO train.py).

Instead of x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with random eps, InPO obtains x_t by running
DDIM *inversion* of x0 with the policy UNet (no grad) over a coarse grid {1, 101, ..., 901}, adding
eta * sigma noise after each step, and re-derives the noise the model must predict:

    eps_hat = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)

The Diffusion-DPO loss is then unchanged, with (x_t, eps_hat) in place of (x_t, eps).

Stated deviations from the reference code: inversion starts from x0 with abar = 1 (clean), and with
``exact_t`` (default) it ends with one partial DDIM step from the last grid point below t to t itself,
so x_t really sits at the timestep the UNet is told; the reference code stops at the grid point below
t and labels it t (``exact_t=False`` reproduces that). Each pair has its own t (the code uses one t per
batch); samples whose t is reached stop moving while the others continue.
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor


def inversion_grid(num_train_timesteps: int = 1000, steps: int = 10) -> list[int]:
    """DDIMInverseScheduler's grid with ``steps`` inference steps: {1, 101, ..., 901} for 1000/10."""
    stride = num_train_timesteps // steps
    return [1 + k * stride for k in range(steps)]


def _step(x: Tensor, eps: Tensor, a_cur: Tensor, a_next: Tensor) -> Tensor:
    """Deterministic DDIM step between noise levels (here: upward, inverting)."""
    x0_hat = (x - (1 - a_cur).sqrt() * eps) / a_cur.sqrt()
    return a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps


@torch.no_grad()
def ddim_invert(unet, x0: Tensor, t: Tensor, unet_kwargs: dict, alphas_cumprod: Tensor, steps: int = 10,
                eta: float = 0.1, generators: list[torch.Generator] | None = None, exact_t: bool = True
                ) -> tuple[Tensor, Tensor]:
    """Invert ``x0`` [N, C, h, w] to each sample's ``t`` [N]; returns (x_t, eps_hat). ``unet_kwargs`` are the
    conditioning kwargs for N samples. ``generators`` (one per sample) draw the eta noise."""
    dev = x0.device
    ac = alphas_cumprod.to(dev, torch.float32)
    n = x0.shape[0]
    grid = inversion_grid(len(ac), steps)
    stride = grid[1] - grid[0] if len(grid) > 1 else len(ac)
    x = x0.float().clone()
    a_cur = torch.ones(n, device=dev)  # x0 is clean
    t = t.to(dev)

    def bcast(v):
        return v.view(-1, *[1] * (x.dim() - 1))

    def noise_like():
        if generators is None:
            return torch.randn_like(x)
        return torch.stack([torch.randn(x.shape[1:], generator=g) for g in generators]).to(dev)

    for g in grid:
        active = g < t  # grid points strictly below each sample's t
        if not bool(active.any()):
            break
        eps = unet(x.to(x0.dtype), torch.full((n,), g, device=dev, dtype=torch.long), **unet_kwargs).sample.float()
        a_next = torch.full((n,), float(ac[g]), device=dev)
        x_new = _step(x, eps, bcast(a_cur), bcast(a_next))
        if eta > 0:
            hi = min(g + stride, len(ac) - 1)
            var = (1 - ac[g]) / (1 - ac[hi]) * (1 - ac[hi] / ac[g])
            x_new = x_new + eta * var.clamp(min=0).sqrt() * noise_like()
        x = torch.where(bcast(active), x_new, x)
        a_cur = torch.where(active, a_next, a_cur)
    a_t = ac[t]
    if exact_t:  # the last partial step: from the grid point below t to t itself (UNet at the target
        eps = unet(x.to(x0.dtype), t, **unet_kwargs).sample.float()  # timestep, as in DDIMInverseScheduler)
        x = _step(x, eps, bcast(a_cur), bcast(a_t))
    eps_hat = (x - bcast(a_t).sqrt() * x0.float()) / bcast(1 - a_t).sqrt()
    return x, eps_hat
