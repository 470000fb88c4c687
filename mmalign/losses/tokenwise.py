"""Token-level objectives: LD-DPO and SparsePO.

Inputs are per-token log-probs ``[B, T]`` of the completion tokens (already shifted so position t
scores token t), and completion masks ``[B, T]`` (1 on completion tokens, 0 on prompt/padding), for
policy and reference, chosen and rejected.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import as_float, pair_metrics, register
from .pairwise import dpo

Tensor = torch.Tensor


def _check_tokens(**ts: Tensor):
    first = None
    for name, t in ts.items():
        if t is None:
            continue
        if t.dim() != 2:
            raise ValueError(f"{name} must be [B, T] per-token values, got shape {tuple(t.shape)}")
        if first is None:
            first = (name, t.shape[0])
        elif t.shape[0] != first[1]:
            raise ValueError(f"{name} has batch {t.shape[0]} but {first[0]} has {first[1]}")


def ld_sequence_scores(chosen_tok: Tensor, rejected_tok: Tensor, chosen_mask: Tensor, rejected_mask: Tensor,
                       alpha: float) -> tuple[Tensor, Tensor]:
    """LD-DPO's length-desensitised sequence log-prob (Liu et al. 2024, arXiv 2409.06411, Eq. 11):
    log pi(y) -> log pi(y_{<=l_p}) + alpha * log pi(y_{>l_p}), l_p = min(|y_w|, |y_l|) per pair.
    Applied to policy *and* reference (TRL HEAD); a precomputed reference must use the same alpha."""
    _check_tokens(chosen_tok=chosen_tok, rejected_tok=rejected_tok, chosen_mask=chosen_mask, rejected_mask=rejected_mask)
    cm, rm = chosen_mask.to(chosen_tok.dtype), rejected_mask.to(rejected_tok.dtype)
    shared = torch.minimum(cm.sum(-1), rm.sum(-1)).unsqueeze(-1)

    def one(tok, m):
        pos = m.cumsum(-1)
        head = (pos <= shared) & (m > 0)
        tail = (pos > shared) & (m > 0)
        return (tok * head).sum(-1) + alpha * (tok * tail).sum(-1)

    return one(as_float(chosen_tok), cm), one(as_float(rejected_tok), rm)


@register("ld_dpo", kind="token")
def ld_dpo(policy_chosen_tok, policy_rejected_tok, ref_chosen_tok, ref_rejected_tok, chosen_mask, rejected_mask,
           *, beta: float = 0.1, alpha: float = 0.5, label_smoothing: float = 0.0):
    """LD-DPO (arXiv 2409.06411): DPO on ``ld_sequence_scores``. alpha = 1 is plain DPO."""
    pc, pr = ld_sequence_scores(policy_chosen_tok, policy_rejected_tok, chosen_mask, rejected_mask, alpha)
    rc, rr = ld_sequence_scores(ref_chosen_tok, ref_rejected_tok, chosen_mask, rejected_mask, alpha)
    return dpo(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing)


ld_dpo.sequence_scores = ld_sequence_scores


@torch.no_grad()
def activation_mask(hidden: Tensor, mask: Tensor, mode: str = "sigmoid") -> Tensor:
    """Model-derived SparsePO token weights from *reference* activations ``[B, T, H]`` (arXiv 2410.05102,
    Sec. 3.2 "MaPO"): ``sigmoid`` = mean_h sigma(h); ``zn_rescale`` = per-sequence z-normalised mean
    activation, min-max rescaled to [0, 1] over the completion (constant sequences give 1).
    Returns ``[B, T]`` weights in [0, 1], zero outside ``mask``."""
    h = as_float(hidden)
    m = mask.to(h.dtype)
    if mode == "sigmoid":
        w = torch.sigmoid(h).mean(-1)
    elif mode == "zn_rescale":
        a = h.mean(-1)
        n = m.sum(-1, keepdim=True).clamp(min=1.0)
        mu = (a * m).sum(-1, keepdim=True) / n
        sd = (((a - mu) ** 2 * m).sum(-1, keepdim=True) / n).sqrt() + 1e-12
        z = (a - mu) / sd
        big = torch.finfo(z.dtype).max
        lo = z.masked_fill(m == 0, big).min(-1, keepdim=True).values
        hi = z.masked_fill(m == 0, -big).max(-1, keepdim=True).values
        rng = hi - lo
        w = torch.where(rng > 0, (z - lo) / rng.clamp(min=1e-12), torch.ones_like(z))
    else:
        raise ValueError(f"unknown activation_mask mode {mode!r}; choose 'sigmoid' or 'zn_rescale'")
    return w * m


def token_kl(policy_logits: Tensor, ref_logits: Tensor) -> Tensor:
    """k_t = sum_v p_ref(v) (log p_theta(v) - log p_ref(v)) = -KL(p_ref || p_theta) per position, in fp32
    (the sequential-KL term of TDPO/SparsePO). Shapes ``[B, T, V] -> [B, T]``."""
    lp = F.log_softmax(as_float(policy_logits), -1)
    lr = F.log_softmax(as_float(ref_logits), -1)
    return (lr.exp() * (lp - lr)).sum(-1)


@register("sparse_po", kind="token", uses=("token_weights", "token_kl"))
def sparse_po(policy_chosen_tok, policy_rejected_tok, ref_chosen_tok, ref_rejected_tok, chosen_mask, rejected_mask,
              *, beta: float = 0.1, chosen_weights=None, rejected_weights=None, chosen_kl=None, rejected_kl=None,
              chosen_kl_weights=None, rejected_kl_weights=None, l1_u: float = 0.0, l1_d: float = 0.0):
    """SparsePO (Christopoulou et al. 2024, arXiv 2410.05102, Eq. 6-7):

        u = sum_t m^u_t rho_t(y_w) - sum_t m^u_t rho_t(y_l)            (rho_t: per-token log-ratio)
        d = sum_t m^d_t k_t(y_w)  - sum_t m^d_t k_t(y_l)               (k_t: ``token_kl``)
        L = -log sigma(beta (u - d)) + l1_u ||m^u||_1 + l1_d ||m^d||_1  (L1 terms: token means)

    Weights default to the completion mask (so with no KL terms this is exactly DPO); the
    reference-derived variant passes ``activation_mask`` weights; learned masks pass trainable ones.
    ``m^d`` defaults to ``m^u`` (MaPO shares one mask)."""
    _check_tokens(policy_chosen_tok=policy_chosen_tok, policy_rejected_tok=policy_rejected_tok,
                  ref_chosen_tok=ref_chosen_tok, ref_rejected_tok=ref_rejected_tok)
    cm, rm = as_float(chosen_mask.to(torch.float32)), as_float(rejected_mask.to(torch.float32))
    wc = cm if chosen_weights is None else as_float(chosen_weights) * cm
    wr = rm if rejected_weights is None else as_float(rejected_weights) * rm
    rho_c = as_float(policy_chosen_tok) - as_float(ref_chosen_tok)
    rho_r = as_float(policy_rejected_tok) - as_float(ref_rejected_tok)
    u_c, u_r = (wc * rho_c).sum(-1), (wr * rho_r).sum(-1)
    d_c = d_r = torch.zeros_like(u_c)
    kc = wc if chosen_kl_weights is None else as_float(chosen_kl_weights) * cm
    kr = wr if rejected_kl_weights is None else as_float(rejected_kl_weights) * rm
    if chosen_kl is not None:
        d_c = (kc * as_float(chosen_kl)).sum(-1)
    if rejected_kl is not None:
        d_r = (kr * as_float(rejected_kl)).sum(-1)
    loss = -F.logsigmoid(beta * ((u_c - u_r) - (d_c - d_r)))
    if l1_u:
        loss = loss + l1_u * (wc.abs().sum(-1) / cm.sum(-1).clamp(min=1) + wr.abs().sum(-1) / rm.sum(-1).clamp(min=1))
    if l1_d:
        loss = loss + l1_d * (kc.abs().sum(-1) / cm.sum(-1).clamp(min=1) + kr.abs().sum(-1) / rm.sum(-1).clamp(min=1))
    return loss, pair_metrics(beta * (u_c - d_c), beta * (u_r - d_r))
