"""Group RL objectives for samples of the current policy (online rounds of diffusion and flow models): per-sample
losses from group-normalised advantages. Pure tensor functions; the modality adapter supplies the log-probs or
predictions (``mmalign.diffusion.rl``).

* ``grpo``  Flow-GRPO (Liu et al. 2025, arXiv 2505.05470, Eq. 7-8) / DDPO (Black et al. 2023, arXiv 2305.13301):
  the PPO clipped surrogate on the per-step likelihood ratio of the sampler's Gaussian transitions, plus a KL
  to the reference.
* ``awm``   Advantage Weighted Matching (Xue et al. 2025, arXiv 2509.25050, Eq. 9): the same surrogate on the
  negative flow-matching loss of the final sample (a forward-process "log-likelihood"), plus a KL to the
  reference and an optional KL to a slow-moving anchor.
* ``nft``   DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117, Eq. 7): negative-aware fine-tuning -- the
  flow-matching loss of an implicit positive and an implicit negative policy mixed by the advantage.

Advantages: ``group_advantages`` -- (r - mean of the prompt's group) / (std + 1e-4), std per group or over the
whole round (flow_grpo's ``global_std``); a group whose rewards are all equal gets 0, never NaN.
"""
from __future__ import annotations

import torch

from ._common import as_float, register

Tensor = torch.Tensor


def group_advantages(rewards: Tensor, groups: Tensor, global_std: bool = True, eps: float = 1e-4) -> Tensor:
    """``rewards`` [N], ``groups`` [N] integer group id per sample -> advantages [N]: the reward minus its group's
    mean, over (std + eps) with the std of the group or, ``global_std``, of every reward (flow_grpo's SD3 configs;
    ``PerPromptStatTracker``). Equal rewards in a group give 0 (no NaN)."""
    r = as_float(rewards).double()
    g = torch.as_tensor(groups, device=r.device).long()
    n = int(g.max()) + 1 if len(g) else 0
    count = torch.zeros(n, dtype=r.dtype, device=r.device).index_add_(0, g, torch.ones_like(r))
    mean = torch.zeros(n, dtype=r.dtype, device=r.device).index_add_(0, g, r) / count
    centred = r - mean[g]
    if global_std:
        std = r.std(unbiased=False) if len(r) > 1 else torch.zeros((), dtype=r.dtype)
        out = centred / (std + eps)
    else:
        var = torch.zeros(n, dtype=r.dtype, device=r.device).index_add_(0, g, centred ** 2) / count
        out = centred / (var.sqrt()[g] + eps)
    return out.to(as_float(rewards).dtype)


def _ppo_clip(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_range: float, adv_clip: float):
    """max(-A ratio, -A clip(ratio, 1 +- eps)) per row, ratio = exp(logp - old_logp); A clipped to +-adv_clip."""
    a = torch.clamp(as_float(advantages).to(logp.device), -adv_clip, adv_clip)
    if logp.dim() == 2:  # [B, W] steps of a trajectory: each step its own ratio, the sample's mean over steps
        a = a.unsqueeze(-1).expand_as(logp)
    ratio = torch.exp(as_float(logp) - as_float(old_logp).to(logp.device))
    surrogate = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range))
    clipped = ((ratio - 1.0).abs() > clip_range).to(ratio.dtype)
    if surrogate.dim() == 2:
        surrogate, clipped, ratio = surrogate.mean(-1), clipped.mean(-1), ratio.mean(-1)
    return surrogate, {"ratio": ratio.detach(), "clipfrac": clipped.detach(), "advantage": a.detach()
                       if a.dim() == 1 else a[:, 0].detach()}


@register("grpo", kind="policy_ratio", needs_reference=True)
def grpo(logp: Tensor, old_logp: Tensor, advantages: Tensor, *, kl: Tensor | None = None, clip_range: float = 1e-4,
         kl_beta: float = 0.04, adv_clip: float = 5.0):
    """Flow-GRPO / DDPO (arXiv 2505.05470, Eq. 7-8; arXiv 2305.13301, Eq. 4): per sample,
    L = mean_steps max(-A r_t, -A clip(r_t, 1 - eps, 1 + eps)) + kl_beta * KL,  r_t = exp(logp_t - old_logp_t),
    with ``logp`` [B] or [B, W] the per-dimension *mean* Gaussian log-density of the sampler's step(s) (every peer
    uses the mean: eps = 1e-4 assumes it), ``old_logp`` recorded at sampling, A clipped to +-``adv_clip`` and ``kl``
    [B] the adapter's KL to the reference (flow_grpo: mean_D (mu - mu_ref)^2 / (2 sigma_t^2)). Defaults: eps 1e-4,
    kl_beta 0.04 (flow_grpo's GenEval / OCR SD3.5 configs; 0.01 for PickScore). At logp = old_logp and kl = 0 the
    loss is -A (0 for a centred group) and its gradient is -A d logp."""
    loss, m = _ppo_clip(logp, old_logp, advantages, clip_range, adv_clip)
    if kl is not None:
        kl = as_float(kl).to(loss.device)
        loss = loss + kl_beta * kl
        m["kl"] = kl.detach()
    return loss, m


@register("awm", kind="flow_ratio", needs_reference=True)
def awm(logp: Tensor, old_logp: Tensor, advantages: Tensor, *, kl: Tensor | None = None,
        anchor_kl: Tensor | None = None, clip_range: float = 1.0, kl_beta: float = 1e-4, anchor_beta: float = 0.0,
        adv_clip: float = 5.0, adv_scale: float = 0.2):
    """Advantage Weighted Matching (arXiv 2509.25050, Eq. 9, and the authors' train_sd3_awm.py): per sample,
    L = max(-A' r, -A' clip(r, 1 +- eps)) + kl_beta * KL + anchor_beta * KL_anchor, A' = clip(A, +-5) * 0.2, with
    ``logp`` = -w(t) mean_D (v - (noise - x0))^2 of the final sample at a fresh (t, noise) -- the flow-matching
    loss as a log-likelihood -- and ``old_logp`` its value before the step (the authors take one optimiser step
    per rollout, so old_logp = logp.detach(): r = 1 and the gradient is A' d logp, advantage-weighted flow
    matching). eps 1 (inactive), kl_beta 1e-4 (PickScore config; 1e-3 GenEval), KL = mean_D (v - v_ref)^2
    ('Uniform'); ``anchor_kl`` the same to a slow anchor (AWM's EMA KL; Flow-Factory warns AWM collapses
    without it or a tight clip)."""
    loss, m = _ppo_clip(logp, old_logp, as_float(advantages) * 1.0, clip_range, adv_clip)
    loss = loss * adv_scale  # A' = clip(A) * adv_scale: the surrogate is linear in A
    m["advantage"] = m["advantage"] * adv_scale
    for name, term, beta in (("kl", kl, kl_beta), ("anchor_kl", anchor_kl, anchor_beta)):
        if term is not None:
            term = as_float(term).to(loss.device)
            loss = loss + beta * term
            m[name] = term.detach()
    return loss, m


def nft_r(advantages: Tensor, adv_clip: float = 5.0) -> Tensor:
    """DiffusionNFT's optimality probability r = clip(A, +-c) / c / 2 + 1/2 in [0, 1] (A = c -> 1, -c -> 0)."""
    return torch.clamp(torch.clamp(as_float(advantages), -adv_clip, adv_clip) / adv_clip / 2.0 + 0.5, 0.0, 1.0)


@register("nft", kind="flow_mix", needs_reference=True)
def nft(pred: Tensor, old_pred: Tensor, x0: Tensor, x0_of, advantages: Tensor, *, ref_pred: Tensor | None = None,
        beta: float = 1.0, kl_beta: float = 1e-4, adv_clip: float = 5.0):
    """DiffusionNFT (arXiv 2509.16117, Eq. 7, and the authors' train_nft_sd3.py), per sample:
    with the implicit positive v+ = beta v + (1 - beta) v_old and negative v- = (1 + beta) v_old - beta v,
    x0+- = x0_of(v+-) (flow: x_t - t v), weights w+- = mean_D |x0+- - x0| (fp64, >= 1e-5, no gradient),
    L = c [r mean_D (x0+ - x0)^2 / w+ + (1 - r) mean_D (x0- - x0)^2 / w-] / beta + kl_beta mean_D (v - v_ref)^2,
    r = ``nft_r(A)``, c = ``adv_clip``. ``pred`` [B, ...] with its graph, ``old_pred`` from the old (sampling)
    policy, ``x0_of`` maps a prediction to x0 (the family's linear map at this sample's x_t and t). Defaults:
    beta 1 (GenEval / PickScore / HPSv2), kl_beta 1e-4 (the authors' train.beta). At pred = old_pred (flow,
    x0_of(v) = x_t - t v) the gradient of the policy term is (2 t^2 / (D w)) clip(A) (v - (noise - x0)):
    advantage-weighted flow matching with weight t^2 / w, whatever beta (tests/test_rl.py checks it)."""
    dims = tuple(range(1, pred.dim()))
    r = nft_r(advantages, adv_clip).to(pred.device)
    old = old_pred.detach()
    pos, neg = beta * pred + (1.0 - beta) * old, (1.0 + beta) * old - beta * pred

    def weighted(v):
        x = x0_of(v)
        with torch.no_grad():
            w = (x.double() - x0.double()).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)
        return ((x - x0) ** 2 / w.to(x.dtype)).mean(dim=dims)

    policy = adv_clip * (r * weighted(pos) + (1.0 - r) * weighted(neg)) / beta
    m = {"r": r.detach(), "policy_loss": policy.detach(), "advantage": as_float(advantages).detach()}
    loss = policy
    if ref_pred is not None:
        kl = ((pred - ref_pred.detach()) ** 2).mean(dim=dims)
        loss = loss + kl_beta * kl
        m["kl"] = kl.detach()
    return loss, m
