"""Objectives on groups of on-policy samples (K completions per prompt, scored by a reward): DisCO,
DisCO-b, f-DPG, and HyPO's online KL term.

Group losses take ``policy`` ``[B, K]`` (the sequence scores of the sampled completions, with their graph),
``ref`` ``[B, K]`` or None, ``rewards`` ``[B, K]`` and ``mask`` ``[B, K]``; they return one loss per prompt
(group) and metrics, like every loss of the core.
"""
from __future__ import annotations

import torch

from ._common import DIVERGENCES, as_float, f_score, register
from .pairwise import dpo

Tensor = torch.Tensor


def check_group(policy: Tensor, rewards, mask, ref=None):
    policy = as_float(policy)
    if policy.dim() != 2:
        raise ValueError(f"group scores must be [B, K] (K samples per prompt), got shape {tuple(policy.shape)}")
    rewards = as_float(torch.as_tensor(rewards, device=policy.device)).to(policy.dtype)
    mask = torch.ones_like(policy, dtype=torch.bool) if mask is None else torch.as_tensor(mask, device=policy.device).bool()
    ref = None if ref is None else as_float(ref)
    for name, t in (("rewards", rewards), ("mask", mask), ("ref", ref)):
        if t is not None and t.shape != policy.shape:
            raise ValueError(f"group: {name} has shape {tuple(t.shape)} but scores have {tuple(policy.shape)}")
    return policy, rewards, mask, ref


def _kl_constraint(kl, beta: float, delta: float, like: Tensor) -> Tensor:
    """DisCO's squared-hinge constraint as the authors apply it: max(beta (KL - delta), 0).detach() * KL."""
    if kl is None:
        return torch.zeros((), dtype=like.dtype, device=like.device)
    kl = torch.as_tensor(kl, device=like.device).to(like.dtype)
    return torch.clamp(beta * (kl - delta), min=0.0).detach() * kl


def _group_metrics(score: Tensor, rewards: Tensor, pos: Tensor, neg: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """Per group: how often a positive sample outscores a negative one (the discriminative objective's
    accuracy), the score gap, the mean reward and whether the group counted."""
    s = score.detach()
    pair = pos.unsqueeze(-1) & neg.unsqueeze(-2)
    diff = s.unsqueeze(-1) - s.unsqueeze(-2)
    n = pair.sum((-1, -2)).clamp(min=1).to(s.dtype)
    acc = (((diff > 0).to(s.dtype) + 0.5 * (diff == 0).to(s.dtype)) * pair).sum((-1, -2)) / n
    return {"reward_accuracy": torch.where(valid, acc, torch.full_like(acc, 0.5)),
            "reward_margin": (diff * pair).sum((-1, -2)) / n, "reward": rewards.mean(-1),
            "valid_group": valid.to(s.dtype)}


def _disco(policy, rewards, mask, lengths, kl, tau, beta, delta, balanced: bool):
    policy, rewards, mask, _ = check_group(policy, rewards, mask)
    s = policy if lengths is None else policy / torch.as_tensor(lengths, device=policy.device).to(policy.dtype).clamp(min=1)
    bad = ~((rewards == 0) | (rewards == 1)) & mask
    if bool(bad.any()):
        raise ValueError("disco takes binary rewards (1 correct, 0 wrong); use f_dpg or reinforce for graded rewards")
    pos, neg = (rewards == 1) & mask, (rewards == 0) & mask
    valid = pos.any(-1) & neg.any(-1)  # groups that are all correct or all wrong carry no signal: dropped
    n_pos, n_neg = pos.sum(-1).clamp(min=1).to(s.dtype), neg.sum(-1).clamp(min=1).to(s.dtype)
    mean_pos = (s * pos).sum(-1) / n_pos
    if balanced:  # DisCO-b: mean score of the correct minus mean score of the wrong samples
        j = mean_pos - (s * neg).sum(-1) / n_neg
    else:  # DisCO: tau * log-mean-exp of the wrong samples' scores (a soft max), Eq. 10
        lme = torch.logsumexp((s / tau).masked_fill(~neg, float("-inf")), -1) - torch.log(n_neg)
        j = mean_pos - tau * torch.where(valid, lme, torch.zeros_like(lme))
    loss = torch.where(valid, -j, torch.zeros_like(j)) + _kl_constraint(kl, beta, delta, s)
    return loss, _group_metrics(s, rewards, pos, neg, valid)


@register("disco", kind="group", uses=("list_lengths", "group_kl"), needs_reference=False)
def disco(policy, ref, rewards, *, tau: float = 10.0, beta: float = 1e3, delta: float = 1e-4, mask=None,
          lengths=None, kl=None):
    """DisCO, discriminative constrained optimisation (Li et al. 2025, arXiv 2505.12366, Eq. 10, ``logL``
    score): per prompt with binary rewards,

        J = mean_{y+} s(y+) - tau * log mean_{y-} exp(s(y-) / tau),     s = token-mean log pi(y)

    loss = -J per group (groups whose samples are all correct or all wrong are dropped, contributing 0, as
    the authors do) + max(beta (KL - delta), 0).detach() * KL when ``kl`` -- a KL estimate to the sampling
    policy with its graph -- is given (the squared-hinge trust region). ``lengths`` turn summed log-probs
    into token means. Defaults tau 10, beta 1e3, delta 1e-4 are the authors' launch scripts'. The value is
    the objective itself (the authors' code returns a surrogate whose value is not J but whose gradient is
    the same: tests compare gradients)."""
    return _disco(policy, rewards, mask, lengths, kl, tau, beta, delta, balanced=False)


@register("disco_b", kind="group", uses=("list_lengths", "group_kl"), needs_reference=False)
def disco_b(policy, ref, rewards, *, beta: float = 1e3, delta: float = 1e-4, mask=None, lengths=None, kl=None):
    """DisCO-b (arXiv 2505.12366, Eq. 9): J = mean_{y+} s(y+) - mean_{y-} s(y-), the balanced discriminative
    objective, with DisCO's constraint and group dropping (see ``disco``)."""
    return _disco(policy, rewards, mask, lengths, kl, 1.0, beta, delta, balanced=True)


@register("f_dpg", kind="group")
def f_dpg(policy, ref, rewards, *, beta: float = 0.1, divergence: str = "forward_kl", alpha: float = 0.5, mask=None):
    """f-DPG, f-divergence distributional policy gradient (Go et al. 2023, arXiv 2302.08215, Eq. 5-6),
    on-policy (proposal q = pi, so the importance ratio pi/q is 1): the target is the KL-regularised optimum
    p(y) proportional to pi_ref(y) exp(r(y) / beta); Z is estimated per prompt by importance sampling over
    the group, log Z = log mean_k exp(log P(y_k) - log pi(y_k)).

        A_k = -f'(pi(y_k) / p(y_k)) - mean_j(-f'(pi(y_j) / p(y_j)))          (the group mean is the baseline)
        loss = -mean_k A_k log pi(y_k)                                        (A detached)

    ``divergence``: forward_kl (DPG's KL(p || pi): -f' = p/pi up to a constant), reverse_kl, js, alpha
    (the maps of ``f_score``). When pi reaches p every A is 0."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    policy, rewards, mask, ref = check_group(policy, rewards, mask, ref)
    if ref is None:
        raise ValueError("f_dpg needs the reference scores (its target is pi_ref exp(r / beta))")
    with torch.no_grad():
        log_p_unnorm = ref + rewards / beta
        w = (log_p_unnorm - policy).masked_fill(~mask, float("-inf"))
        n = mask.sum(-1, keepdim=True).to(policy.dtype)
        log_z = torch.logsumexp(w, -1, keepdim=True) - torch.log(n)
        log_t = policy - (log_p_unnorm - log_z)  # log(pi / p)
        adv = -f_score(log_t, divergence, alpha)
        adv = (adv - (adv * mask).sum(-1, keepdim=True) / n) * mask
    loss = -(adv * policy * mask).sum(-1) / n.squeeze(-1)
    return loss, {"reward": ((rewards * mask).sum(-1) / n.squeeze(-1)).detach(),
                  "kl_to_target": ((log_t * mask).sum(-1) / n.squeeze(-1)).detach(),
                  "advantage_abs": ((adv.abs() * mask).sum(-1) / n.squeeze(-1)).detach()}


@register("hypo", uses=("online_samples",), reference_free_ok=False)
def hypo(pc, pr, rc, rr, *, beta: float = 0.1, kl_weight: float = 0.1, label_smoothing: float = 0.0,
         sample_logps=None, sample_ref_logps=None, sample_mask=None):
    """HyPO, hybrid preference optimisation (Song et al. 2024, arXiv 2406.01462, Alg. 1): offline DPO on the
    preference pairs plus ``kl_weight`` x an estimate of KL(pi || pi_ref) on fresh samples of the policy,

        L = L_DPO(offline pair) + lambda * KL_hat,    KL_hat = mean_k rho(y_k),  y_k ~ pi,  rho = log pi - log pi_ref

    The KL term is differentiated by REINFORCE: grad KL = E_pi[rho grad log pi], so its surrogate is
    mean_k (rho_k - mean rho).detach() * log pi(y_k) (the group mean as baseline); the reported ``kl`` is
    KL_hat. ``sample_logps`` / ``sample_ref_logps`` ``[B, K]``: sequence log-probs of K samples of the
    pair's prompt (``sample_mask`` marks valid ones). Without samples it is DPO."""
    loss, metrics = dpo(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing)
    if sample_logps is None:
        return loss, metrics
    s = as_float(sample_logps)
    r = as_float(torch.as_tensor(sample_ref_logps, device=s.device))
    if s.dim() != 2 or s.shape[0] != loss.shape[0] or r.shape != s.shape:
        raise ValueError(f"hypo: sample_logps / sample_ref_logps must be [B={loss.shape[0]}, K], got "
                         f"{tuple(s.shape)} / {tuple(r.shape)}")
    m = torch.ones_like(s, dtype=torch.bool) if sample_mask is None else torch.as_tensor(sample_mask, device=s.device).bool()
    n = m.sum(-1).clamp(min=1).to(s.dtype)
    rho = (s - r).detach()
    kl_hat = (rho * m).sum(-1) / n
    adv = (rho - kl_hat.unsqueeze(-1)) * m
    surrogate = (adv * s).sum(-1) / n
    metrics["kl"] = kl_hat
    return loss + kl_weight * surrogate, metrics
