"""Listwise objectives over K responses per prompt: LiPO-lambda and PRO.

Inputs are ``[B, K]`` score tensors, ``labels`` ``[B, K]`` (graded relevance / reward, higher is
better) and an optional boolean ``mask`` ``[B, K]`` for lists shorter than K.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import as_float, register, tie_accuracy

Tensor = torch.Tensor


def check_listwise(policy: Tensor, ref: Tensor | None, labels, mask):
    policy = as_float(policy)
    if policy.dim() != 2:
        raise ValueError(f"listwise scores must be [B, K], got shape {tuple(policy.shape)}")
    ref = torch.zeros_like(policy) if ref is None else as_float(ref)
    labels = as_float(torch.as_tensor(labels, device=policy.device)).to(policy.dtype)
    for name, t in (("ref", ref), ("labels", labels)):
        if t.shape != policy.shape:
            raise ValueError(f"listwise: {name} has shape {tuple(t.shape)} but scores have {tuple(policy.shape)}")
    mask = torch.ones_like(policy, dtype=torch.bool) if mask is None else torch.as_tensor(mask, device=policy.device).bool()
    if mask.shape != policy.shape:
        raise ValueError(f"listwise: mask has shape {tuple(mask.shape)} but scores have {tuple(policy.shape)}")
    n = mask.sum(-1)
    if (n < 2).any():
        raise ValueError(f"listwise: row {int((n < 2).nonzero()[0])} has fewer than 2 valid responses")
    return policy, ref, labels, mask


def _pair_order_metrics(s: Tensor, pair: Tensor) -> dict[str, Tensor]:
    """Accuracy = share of correctly ordered label pairs (ties 0.5); margin = mean s_i - s_j over them."""
    diff = (s.unsqueeze(-1) - s.unsqueeze(-2)).detach()
    pf = pair.to(s.dtype)
    npairs = pf.sum((-1, -2)).clamp(min=1.0)
    return {"reward_accuracy": (tie_accuracy(diff) * pf).sum((-1, -2)) / npairs,
            "reward_margin": (diff * pf).sum((-1, -2)) / npairs}


@register("lipo", kind="listwise")
def lipo(policy, ref, labels, *, beta: float = 0.1, mask=None):
    """LiPO-lambda (Liu et al. 2024, arXiv 2402.01878, Eq. 7-8; LambdaLoss DCG weights):

        s_i = beta (log pi(y_i) - log pi_ref(y_i))
        L   = sum_{psi_i > psi_j} Delta_ij * log(1 + exp(-(s_i - s_j)))
        Delta_ij = |G_i - G_j| * |1/D(tau_i) - 1/D(tau_j)|,  G = 2^psi - 1,  D(tau) = log2(1 + tau)

    tau is the 1-based rank of each response under the *current* s (detached, as in TF-Ranking's
    DCGLambdaWeight). Labels psi are used as given (normalise them to [0, 1] upstream if they are raw
    rewards). K = 2 is DPO weighted by Delta_12.
    """
    policy, ref, labels, mask = check_listwise(policy, ref, labels, mask)
    s = beta * (policy - ref)
    with torch.no_grad():
        key = s.masked_fill(~mask, float("-inf"))
        order = torch.argsort(key, dim=-1, descending=True, stable=True)
        tau = torch.empty_like(order)
        tau.scatter_(-1, order, torch.arange(1, s.shape[-1] + 1, device=s.device).expand_as(order))
        inv_d = 1.0 / torch.log2(1.0 + tau.to(s.dtype))
        gain = torch.pow(2.0, labels) - 1.0
        delta = (gain.unsqueeze(-1) - gain.unsqueeze(-2)).abs() * (inv_d.unsqueeze(-1) - inv_d.unsqueeze(-2)).abs()
    valid = mask.unsqueeze(-1) & mask.unsqueeze(-2)
    pair = (labels.unsqueeze(-1) > labels.unsqueeze(-2)) & valid
    sdiff = s.unsqueeze(-1) - s.unsqueeze(-2)
    loss = (delta * F.softplus(-sdiff) * pair.to(s.dtype)).sum((-1, -2))
    return loss, _pair_order_metrics(s, pair)


@register("pro", kind="listwise", needs_reference=False)
def pro(policy, ref, labels, *, mask=None):
    """PRO, preference ranking optimisation (Song et al. 2024, arXiv 2306.17492, Eq. 6 with the
    reward-gap temperature of Sec. 3.3), reference-free over mean-token log-probs s:

        L = sum_k [ log( e^{s_k T_k} + sum_{j>k} e^{s_j T_kj} ) - s_k T_k ]

    with responses sorted by reward R (``labels``) descending, T_kj = R_k - R_j, T_k = max_{j>k} T_kj.
    Computed with logsumexp (the reference code's log(1e-10 + sum exp) overflows). The paper's SFT
    term on the top response is not included here; add it with an ``sft`` weight in the recipe.
    """
    policy, _, labels, mask = check_listwise(policy, None, labels, mask)
    key = labels.masked_fill(~mask, float("-inf"))
    order = torch.argsort(key, dim=-1, descending=True, stable=True)
    s = policy.gather(-1, order)
    r = labels.gather(-1, order)
    m = mask.gather(-1, order)
    K = s.shape[-1]
    idx = torch.arange(K, device=s.device)
    later = (idx.unsqueeze(0) > idx.unsqueeze(1)) & m.unsqueeze(-2)  # [B, k, j]: j > k and j valid
    t_kj = (r.unsqueeze(-1) - r.unsqueeze(-2)).masked_fill(~later, float("-inf"))
    t_k = t_kj.max(-1).values  # [B, k]
    has_later = later.any(-1) & m
    t_k = torch.where(has_later, t_k, torch.zeros_like(t_k))
    t_kj = torch.where(later, t_kj, torch.zeros_like(t_kj))
    own = s * t_k
    others = (s.unsqueeze(-2) * t_kj).masked_fill(~later, float("-inf"))
    lse = torch.logsumexp(torch.cat([own.unsqueeze(-1), others], dim=-1), dim=-1)
    loss = ((lse - own) * has_later.to(s.dtype)).sum(-1)
    pair = (labels.unsqueeze(-1) > labels.unsqueeze(-2)) & mask.unsqueeze(-1) & mask.unsqueeze(-2)
    return loss, _pair_order_metrics(policy, pair)


@register("irpo", kind="listwise", uses=("list_lengths",))
def irpo(policy, ref, labels, *, beta: float = 0.1, mask=None, lengths=None):
    """IRPO, in-context ranking preference optimisation (Wu et al. 2025, arXiv 2504.15477; the authors'
    ``rdpo_loss``):

        r_i  = beta * rho_i          rho_i = token-mean log pi(y_i) - token-mean log pi_ref(y_i)
        w_i  = (2^rel_i - 1) / log2(1 + rank_i)          rank_i = 1 + #{j: rel_j > rel_i}
        L    = -(1/N) sum_i w_i log sigma(-(logsumexp_{j != i}(r_j - r_i) - log(N - 1)))

    Each item is pushed above the (soft) average of the others, weighted by its DCG gain. ``lengths``
    ``[B, K]`` (token counts) turn summed log-probs into the token means the authors use. Deviation: the
    diagonal j = i is excluded with -inf; the authors' code subtracts 100 before multiplying by beta, which
    leaks exp(-100 beta) -- visible for beta << 1 (tests compare both at beta = 1). At pi = pi_ref every
    item's term is log 2, so the loss is ln 2 x mean(w); it is invariant to permuting a list."""
    policy, ref, labels, mask = check_listwise(policy, ref, labels, mask)
    if lengths is not None:
        ln = torch.as_tensor(lengths, device=policy.device).to(policy.dtype).clamp(min=1.0)
        policy, ref = policy / ln, ref / ln
    r = beta * (policy - ref)
    rel = labels
    higher = (rel.unsqueeze(-2) > rel.unsqueeze(-1)) & mask.unsqueeze(-2) & mask.unsqueeze(-1)  # [b, i, j]: rel_j > rel_i
    rank = 1.0 + higher.to(r.dtype).sum(-1)
    w = (2.0 ** rel - 1.0) / torch.log2(1.0 + rank)
    k = r.shape[-1]
    diffs = r.unsqueeze(-2) - r.unsqueeze(-1)  # [b, i, j] = r_j - r_i
    keep = mask.unsqueeze(-2) & ~torch.eye(k, dtype=torch.bool, device=r.device)
    lse = torch.logsumexp(diffs.masked_fill(~keep, float("-inf")), dim=-1)
    n = mask.sum(-1, keepdim=True).to(r.dtype)
    item = -w * F.logsigmoid(-(lse - torch.log(n - 1.0)))
    loss = (item * mask).sum(-1) / n.squeeze(-1)
    pair = (rel.unsqueeze(-1) > rel.unsqueeze(-2)) & mask.unsqueeze(-1) & mask.unsqueeze(-2)
    return loss, _pair_order_metrics(r, pair)
