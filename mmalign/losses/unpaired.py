"""Unpaired and negatives-only objectives: KTO, APO-zero (unpaired), BCO (unpaired), D2O."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import as_float, register, tie_accuracy
from .pairwise import RunningMoments

Tensor = torch.Tensor


def check_unpaired(policy: Tensor, ref: Tensor | None, labels) -> tuple[Tensor, Tensor, Tensor]:
    """1-D scores plus 0/1 labels (1 = desirable). Anything but 0/1 (e.g. 0.5 ties) is an error."""
    if policy.dim() != 1:
        raise ValueError(f"policy must be 1-D (one score per sample), got shape {tuple(policy.shape)}")
    policy = as_float(policy)
    ref = torch.zeros_like(policy) if ref is None else as_float(ref)
    if ref.shape != policy.shape:
        raise ValueError(f"ref has shape {tuple(ref.shape)} but policy has {tuple(policy.shape)}")
    labels = torch.as_tensor(labels, device=policy.device)
    if labels.shape != policy.shape:
        raise ValueError(f"labels has shape {tuple(labels.shape)} but policy has {tuple(policy.shape)}")
    bad = ~((labels == 0) | (labels == 1))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"labels must be 0 (undesirable) or 1 (desirable); row {i} has {labels[i].item()}")
    return policy, ref, labels.bool()


def unpaired_metrics(rewards: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """reward_accuracy: the signed reward agrees with the label (0.5 at zero); margin: signed reward."""
    signed = torch.where(labels, rewards, -rewards).detach()
    return {"reward_accuracy": tie_accuracy(signed), "reward_margin": signed, "reward": rewards.detach()}


@torch.no_grad()
def kto_kl(policy_kl_logps: Tensor, ref_kl_logps: Tensor, gather=None) -> Tensor:
    """KTO's reference point z0 = max(0, E[log pi(y'|x) - log pi_ref(y'|x)]) over mismatched pairs
    (arXiv 2402.01306, Sec. 4.1; TRL cycles completions within the batch), detached and averaged over ranks."""
    kl = (as_float(policy_kl_logps) - as_float(ref_kl_logps)).mean()
    if gather is not None:
        kl = gather(kl.reshape(1)).mean()
    return kl.clamp(min=0.0)


@register("kto", kind="unpaired", uses=("kl",))
def kto(policy, ref, labels, *, beta: float = 0.1, kl: float | Tensor = 0.0,
        desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO (Ethayarajh et al. 2024, arXiv 2402.01306, Eq. 7), per sample:
    desirable:   lambda_D (1 - sigma(beta (rho - z0)))
    undesirable: lambda_U (1 - sigma(beta (z0 - rho)))
    z0 = ``kl`` (see ``kto_kl``), treated as a constant. With z0 = 0 it reduces to APO-zero's sigmoids."""
    policy, ref, labels = check_unpaired(policy, ref, labels)
    rho = policy - ref
    z0 = torch.as_tensor(kl, device=rho.device, dtype=rho.dtype).detach()
    loss = torch.where(labels, desirable_weight * (1.0 - torch.sigmoid(beta * (rho - z0))),
                       undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - rho))))
    return loss, unpaired_metrics(beta * rho, labels)


@register("apo_zero_unpaired", kind="unpaired")
def apo_zero_unpaired(policy, ref, labels, *, beta: float = 0.1, desirable_weight: float = 1.0,
                      undesirable_weight: float = 1.0):
    """APO-zero, unpaired (arXiv 2408.06266, Eq. 7 split per sample): lambda_D (1 - sigma(beta rho)) for
    desirable samples, lambda_U sigma(beta rho) for undesirable ones."""
    policy, ref, labels = check_unpaired(policy, ref, labels)
    rho = policy - ref
    loss = torch.where(labels, desirable_weight * (1.0 - torch.sigmoid(beta * rho)),
                       undesirable_weight * torch.sigmoid(beta * rho))
    return loss, unpaired_metrics(beta * rho, labels)


@register("bco_unpaired", kind="unpaired", uses=("running",))
def bco_unpaired(policy, ref, labels, *, beta: float = 0.1, shift: float | Tensor | None = None,
                 running: RunningMoments | None = None):
    """BCO on binary feedback (Jung et al. 2024, arXiv 2404.04656, Eq. 8): desirable -log sigma(r - delta),
    undesirable -log sigma(-(r - delta)), r = beta rho, delta = running mean of r over previous optimiser
    steps (staged here, committed once per step; see ``bco`` for the deviation from TRL)."""
    policy, ref, labels = check_unpaired(policy, ref, labels)
    r = beta * (policy - ref)
    if running is not None:
        shift = running.mean
        running.stage(r)
    delta = 0.0 if shift is None else shift
    loss = torch.where(labels, -F.logsigmoid(r - delta), -F.logsigmoid(-(r - delta)))
    return loss, unpaired_metrics(r, labels)


@register("d2o", kind="negatives")
def d2o(policy_samples, ref_samples, policy_rejected, ref_rejected, *, beta: float = 0.1, alpha: float = 0.1,
        sample_mask=None):
    """D2O, distributional dispreference optimisation from negatives only (Duan et al. 2024,
    arXiv 2403.03419, Eq. 3):

        -log sigma( (beta/K) sum_i log pi(y_i)/pi_r-(y_i)  -  alpha log pi(y_l)/pi_r+(y_l) )

    y_i are K samples from the SFT model ([B, K]; ``sample_mask`` marks valid ones), y_l the
    dispreferred response ([B]). K = 1 with alpha = beta is exactly DPO with the sample as chosen.
    The paper's experiments use K = 11, alpha = beta = 0.1.
    """
    ps, rs = as_float(policy_samples), as_float(ref_samples)
    if ps.dim() != 2 or rs.shape != ps.shape:
        raise ValueError(f"d2o: policy_samples/ref_samples must both be [B, K], got {tuple(ps.shape)}, {tuple(rs.shape)}")
    pl, rl = as_float(policy_rejected), as_float(ref_rejected)
    if pl.shape != (ps.shape[0],) or rl.shape != pl.shape:
        raise ValueError(f"d2o: policy_rejected/ref_rejected must be [B]={ps.shape[0]}, got {tuple(pl.shape)}, {tuple(rl.shape)}")
    m = torch.ones_like(ps) if sample_mask is None else torch.as_tensor(sample_mask, device=ps.device).to(ps.dtype)
    k = m.sum(-1)
    if (k < 1).any():
        raise ValueError(f"d2o: row {int((k < 1).nonzero()[0])} has no valid samples")
    pos = beta * ((ps - rs) * m).sum(-1) / k
    neg = alpha * (pl - rl)
    loss = -F.logsigmoid(pos - neg)
    margin = (pos - neg).detach()
    return loss, {"reward_accuracy": tie_accuracy(margin), "reward_margin": margin,
                  "chosen_reward": pos.detach(), "rejected_reward": neg.detach()}


@register("reinforce", kind="policy_gradient", needs_reference=False)
def reinforce(logps, advantages, *, mask=None):
    """REINFORCE with a baseline (Williams 1992; self-critical sequence training, Rennie et al. 2017,
    arXiv 1612.00563, Eq. 9): loss_i = -(1/K) sum_k A_ik log p(y_ik | x_i), A = reward - baseline (detached).

    ``logps`` / ``advantages``: [B, K] (K samples per input; ``mask`` marks valid ones) or [B].
    With the greedy caption's reward as baseline this is SCST; with the mean of the other samples or an
    EMA it is the discriminative-captioning objective (Dessi et al. 2023)."""
    lp = as_float(logps)
    adv = as_float(torch.as_tensor(advantages, device=lp.device)).detach().to(lp.dtype)
    if lp.shape != adv.shape:
        raise ValueError(f"reinforce: logps {tuple(lp.shape)} and advantages {tuple(adv.shape)} differ")
    if lp.dim() == 1:
        lp, adv = lp[:, None], adv[:, None]
    m = torch.ones_like(lp) if mask is None else torch.as_tensor(mask, device=lp.device).to(lp.dtype).view_as(lp)
    k = m.sum(-1).clamp(min=1.0)
    loss = -(adv * lp * m).sum(-1) / k
    a = (adv * m).sum(-1) / k
    pos = ((adv > 0).to(lp.dtype) * m).sum(-1) / k
    return loss, {"advantage": a.detach(), "positive_fraction": pos.detach()}
