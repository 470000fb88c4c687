"""Helpers shared by the loss families: input checks, f-divergence score maps, metrics."""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# exp() arguments are clamped here so that fp32 stays finite (exp(80) ~ 5.5e34), the same bound
# TRL uses for its alpha-divergence; it only bites for |log-ratio| beyond 80/|alpha-1|.
EXP_CLAMP = 80.0

DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")


def as_float(x: Tensor) -> Tensor:
    """Rewards and losses are computed in fp32 (fp64 is kept for exact tests)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def check_pairwise(pc: Tensor, pr: Tensor, rc: Tensor | None, rr: Tensor | None):
    """Validate the four per-sample score tensors of a pairwise loss and upcast them."""
    names = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
    ts = [pc, pr, rc, rr]
    for name, t in zip(names, ts):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D (one score per pair), got shape {tuple(t.shape)}")
        if t.shape != pc.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but policy_chosen has {tuple(pc.shape)}")
    out = [as_float(t) if t is not None else torch.zeros_like(as_float(pc)) for t in ts]
    return out


def log_ratios(pc, pr, rc, rr, reference_free: bool = False):
    """rho_w = log pi(y_w) - log pi_ref(y_w), rho_l likewise; reference_free sets pi_ref uniform (0)."""
    pc, pr, rc, rr = check_pairwise(pc, pr, rc, rr)
    if reference_free:
        rc, rr = torch.zeros_like(rc), torch.zeros_like(rr)
    return pc - rc, pr - rr


def f_score(rho: Tensor, divergence: str = "reverse_kl", alpha: float = 0.5) -> Tensor:
    """f'(pi/pi_ref) as a function of rho = log(pi/pi_ref) (f-DPO, Wang et al. 2023, arXiv 2309.16240, Thm. 1).

    reverse_kl: f'(t) = log t + 1 -> rho (constant dropped: DPO)
    forward_kl: f'(t) = 1 - 1/t -> 1 - exp(-rho)
    js:         f'(t) = log(2t/(1+t)) -> log 2 + logsigmoid(rho)
    alpha:      f'(t) = (t^(alpha-1) - 1)/(alpha-1) -> (exp((alpha-1) rho) - 1)/(alpha-1); alpha=1 is reverse KL.
    Every map is 0 at rho = 0, so all losses keep their policy==reference value. The exp() arguments are
    clamped at EXP_CLAMP (a stated deviation for |rho| > 80) so extreme inputs stay finite.
    """
    if divergence == "reverse_kl":
        return rho
    if divergence == "forward_kl":
        return 1.0 - torch.exp(torch.clamp(-rho, max=EXP_CLAMP))
    if divergence == "js":
        return math.log(2.0) + F.logsigmoid(rho)
    if divergence == "alpha":
        if abs(alpha - 1.0) < 1e-6:
            return rho
        t = torch.clamp((alpha - 1.0) * rho, max=EXP_CLAMP)
        return (torch.exp(t) - 1.0) / (alpha - 1.0)
    raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")


def tie_accuracy(margin: Tensor) -> Tensor:
    """1 where the chosen reward wins, 0 where it loses, 0.5 on exact ties (so policy==ref gives 0.5)."""
    return (margin > 0).to(margin.dtype) + 0.5 * (margin == 0).to(margin.dtype)


def pair_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, Tensor]:
    """Per-example metrics every pairwise loss returns; rewards are beta * log-ratio (detached)."""
    cw, rl = chosen_rewards.detach(), rejected_rewards.detach()
    margin = cw - rl
    return {
        "reward_accuracy": tie_accuracy(margin),
        "reward_margin": margin,
        "chosen_reward": cw,
        "rejected_reward": rl,
    }


def lengths_or_raise(name: str, lengths: Tensor | None, like: Tensor) -> Tensor:
    if lengths is None:
        raise ValueError(f"loss {name!r} needs chosen_lengths and rejected_lengths (token counts)")
    lengths = torch.as_tensor(lengths, device=like.device, dtype=like.dtype)
    if lengths.shape != like.shape:
        raise ValueError(f"{name}: lengths shape {tuple(lengths.shape)} != scores shape {tuple(like.shape)}")
    return lengths.clamp(min=1.0)


from mmalign.registry import Registry  # noqa: E402

LOSSES: Registry = Registry("loss")
"""The single source of loss names. Each entry is a pure function with attributes:

kind       "pairwise" (pc, pr, rc, rr) | "unpaired" (policy, ref, labels) | "listwise" (policy[B,K], ref, labels)
           | "token" (per-token log-probs + completion masks) | "negatives" (D2O) | "policy_gradient"
           | "group" (policy[B,K] of on-policy samples, ref[B,K] | None, rewards[B,K])
           | "policy_ratio" (logp[B] or [B,W] of sampler steps, old_logp, advantages[B]: GRPO)
           | "flow_ratio" (logp[B] = -flow-matching loss, old_logp, advantages[B]: AWM)
           | "flow_mix" (pred, old_pred, x0, x0_of, advantages: DiffusionNFT)
uses       extra inputs the modality adapter supplies (keys of ``INPUTS``), e.g. ("lengths",) or ("kl",)
supplied   the keyword arguments those inputs fill: never user hyper-parameters (the config layer reads this)
needs_reference  False for reference-free objectives (SimPO, PRO): adapters skip the reference forward
precomputable    reference scores can be computed once before training (False where the reference
                 term depends on the batch or on full-vocabulary logits)
batch_dependent  the loss of a row depends on the other rows of the batch (AOT's sort): no accumulation
"""

INPUTS: dict[str, tuple[str, ...]] = {
    "lengths": ("chosen_lengths", "rejected_lengths"),  # completion token counts
    "reward_margin": ("reward_margin",),  # external reward-model margin per pair (MM-DPO)
    "running": ("running", "shift"),  # RunningMoments state (BCO's delta)
    "kl": ("kl",),  # KTO's reference point z0, estimated from mismatched pairs of the whole step
    "token_weights": ("chosen_weights", "rejected_weights", "chosen_kl_weights", "rejected_kl_weights"),  # SparsePO
    "token_kl": ("chosen_kl", "rejected_kl"),  # per-token KL from full-vocabulary logits
    "list_lengths": ("lengths",),  # [B, K] token counts of listwise responses (token-mean scores)
    "online_samples": ("sample_logps", "sample_ref_logps", "sample_mask"),  # [B, K] fresh samples of the policy
    "group_kl": ("kl",),  # a scalar KL estimate with its graph (DisCO's constraint)
}
KIND_INPUTS = {"listwise": ("mask",), "negatives": ("sample_mask",), "policy_gradient": ("mask",), "group": ("mask",)}


def nonfinite_rows(args, mask: Tensor | None, n: int) -> Tensor | None:
    """[n] bool: rows where any float input tensor (per-sample or per-token scores, ``[n, ...]``) is NaN or +-inf;
    entries outside ``mask`` (padding slots of lists / groups, ``[n, K]``) do not count."""
    bad = None
    for t in args:
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() == 0 or t.shape[0] != n:
            continue
        nf = ~torch.isfinite(t.detach())
        if mask is not None and mask.shape == t.shape:
            nf = nf & mask.to(nf.device, torch.bool)
        row = nf.reshape(n, -1).any(dim=1)
        bad = row if bad is None else bad | row.to(bad.device)
    return bad


def bad_rows_are_nan(fn):
    """A non-finite input score (an overflowing MSE, a zero-probability token) makes that row's loss NaN, as a NaN
    score already does, so the training loop treats it as a bad row (``train.nan_policy``) instead of a finite
    loss with zero gradient and +-inf metrics."""
    @functools.wraps(fn)
    def guarded(*args, **kw):
        loss, metrics = fn(*args, **kw)
        if loss.dim() == 1 and len(loss):
            bad = nonfinite_rows(args, kw.get("mask"), len(loss))
            if bad is not None and bool(bad.any()):
                loss = torch.where(bad.to(loss.device), torch.full_like(loss, float("nan")), loss)
        return loss, metrics

    return guarded


def register(name: str, kind: str = "pairwise", uses: tuple = (), needs_reference: bool = True,
             reference_free_ok: bool = False, batch_dependent: bool = False, data_format: str = "pairs"):
    unknown = [u for u in uses if u not in INPUTS]
    if unknown:
        raise ValueError(f"loss {name!r}: unknown input(s) {unknown}; known: {sorted(INPUTS)}")
    supplied = tuple(k for u in uses for k in INPUTS[u]) + KIND_INPUTS.get(kind, ())
    precomputable = needs_reference and not ({"kl", "token_weights", "token_kl"} & set(uses))
    store = LOSSES.register(name, kind=kind, uses=tuple(uses), supplied=supplied, needs_reference=needs_reference,
                            reference_free_ok=reference_free_ok, batch_dependent=batch_dependent,
                            data_format=data_format, precomputable=precomputable)
    return lambda fn: store(bad_rows_are_nan(fn))
