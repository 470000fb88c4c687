"""Pairwise preference losses over per-sample scores.

Every function takes four 1-D tensors -- policy_chosen (pc), policy_rejected (pr), ref_chosen (rc),
ref_rejected (rr) -- plus keyword hyper-parameters, and returns ``(per_example_loss, metrics)``.
Notation (shared/reference/text-objectives.md): rho_w = pc - rc, rho_l = pr - rr, and for the
f-divergence family s = f'(rho) (see ``f_score``), delta = s_w - s_l.

Scores are whatever the modality adapter produces: summed completion log-probs (LLMs, VLMs,
captioners) or ``-mse`` per sample (diffusion; the diffusion recipe passes beta/2, see
``mmalign.diffusion``). Nothing here knows the modality.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import (
    as_float,
    check_pairwise,
    f_score,
    lengths_or_raise,
    log_ratios,
    pair_metrics,
    register,
)

Tensor = torch.Tensor


def _delta(pc, pr, rc, rr, divergence, alpha, reference_free):
    rho_w, rho_l = log_ratios(pc, pr, rc, rr, reference_free)
    s_w, s_l = f_score(rho_w, divergence, alpha), f_score(rho_l, divergence, alpha)
    return rho_w, rho_l, s_w, s_l


def _smoothed_sigmoid(logits: Tensor, eps) -> Tensor:
    """-(1 - eps) log sigma(x) - eps log sigma(-x). ``eps`` is a float in [0, 1) (cDPO), or a per-pair
    tensor in [0, 1] -- soft labels y = 1 - eps, e.g. RPO's Bernoulli labels (eps = 1 flips the pair)."""
    loss = -F.logsigmoid(logits)
    if isinstance(eps, Tensor):
        eps = eps.to(logits.device, logits.dtype)
        if eps.shape != logits.shape or bool(((eps < 0) | (eps > 1)).any()):
            raise ValueError(f"per-pair label_smoothing must have shape {tuple(logits.shape)} with values in [0, 1]")
        return (1.0 - eps) * loss - eps * F.logsigmoid(-logits)
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {eps}")
    if eps:
        loss = (1.0 - eps) * loss - eps * F.logsigmoid(-logits)
    return loss


@register("dpo", reference_free_ok=True)
def dpo(pc, pr, rc, rr, *, beta: float = 0.1, label_smoothing: float | Tensor = 0.0,
        divergence: str = "reverse_kl", alpha: float = 0.5, reference_free: bool = False):
    """DPO (Rafailov et al. 2023, arXiv 2305.18290, Eq. 7): -log sigma(beta * (rho_w - rho_l)).

    ``label_smoothing`` eps > 0 gives conservative DPO (cDPO, Mitchell 2023):
    -(1-eps) log sigma(beta delta) - eps log sigma(-beta delta).
    ``divergence`` swaps rho for f'(pi/pi_ref) (f-DPO, Wang et al. 2023, arXiv 2309.16240, Eq. 11).
    ``reference_free`` treats pi_ref as uniform (DPO paper, Sec. 5 baseline; TRL ``reference_free``).
    At policy == reference the loss is ln 2 for every divergence.
    """
    rho_w, rho_l, s_w, s_l = _delta(pc, pr, rc, rr, divergence, alpha, reference_free)
    loss = _smoothed_sigmoid(beta * (s_w - s_l), label_smoothing)
    return loss, pair_metrics(beta * rho_w, beta * rho_l)


def _fdpo(divergence: str, doc: str):
    def fn(pc, pr, rc, rr, *, beta: float = 0.1, label_smoothing: float = 0.0, alpha: float = 0.5,
           reference_free: bool = False):
        return dpo(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing, divergence=divergence,
                   alpha=alpha, reference_free=reference_free)

    fn.__doc__ = doc
    fn.__name__ = f"dpo_{divergence}"
    return fn


dpo_forward_kl = register("dpo_forward_kl", reference_free_ok=True)(_fdpo(
    "forward_kl", "f-DPO with forward KL, f'(t) = 1 - 1/t (Wang et al. 2023, arXiv 2309.16240, Table 1)."))
dpo_js = register("dpo_js", reference_free_ok=True)(_fdpo(
    "js", "f-DPO with Jensen-Shannon, f'(t) = log(2t/(1+t)) (Wang et al. 2023, arXiv 2309.16240, Table 1)."))
dpo_alpha = register("dpo_alpha", reference_free_ok=True)(_fdpo(
    "alpha", "f-DPO with alpha-divergence, f'(t) = (t^(alpha-1) - 1)/(alpha-1) (arXiv 2309.16240, Table 1);\n"
             "alpha -> 1 recovers reverse KL (plain DPO). TRL's HEAD parameterisation (alpha_old = 1 - alpha)."))

dove = register("dove", data_format="joint")(_fdpo(
    "reverse_kl",
    "DOVE / joint preference optimisation (Bansal et al. 2024, arXiv 2404.00530, Eq. 4).\n\n"
    "The loss is DPO's; what differs is the data: chosen and rejected carry *their own* prompts\n"
    "(x_w, y_w) > (x_l, y_l), so the adapter scores log pi(y_w|x_w) and log pi(y_l|x_l) (or the joint\n"
    "log pi(x, y) with ``joint_distribution``). ``data_format='joint'`` tells the data layer to read\n"
    "``prompt_chosen``/``prompt_rejected``."))


@register("ipo", uses=("lengths",), reference_free_ok=True)
def ipo(pc, pr, rc, rr, *, beta: float = 0.1, chosen_lengths=None, rejected_lengths=None,
        divergence: str = "reverse_kl", alpha: float = 0.5, reference_free: bool = False):
    """IPO (Azar et al. 2023, arXiv 2310.12036, Eq. 17): (h - 1/(2 beta))^2, beta = tau.

    With lengths given, h uses per-token log-ratios (the normalisation TRL confirmed with the IPO
    authors); without lengths (e.g. diffusion scores) h = delta.
    """
    rho_w, rho_l, s_w, s_l = _delta(pc, pr, rc, rr, divergence, alpha, reference_free)
    if chosen_lengths is not None or rejected_lengths is not None:
        s_w = s_w / lengths_or_raise("ipo", chosen_lengths, s_w)
        s_l = s_l / lengths_or_raise("ipo", rejected_lengths, s_l)
    loss = (s_w - s_l - 1.0 / (2.0 * beta)) ** 2
    return loss, pair_metrics(beta * rho_w, beta * rho_l)


@register("hinge", reference_free_ok=True)
def hinge(pc, pr, rc, rr, *, beta: float = 0.1, divergence: str = "reverse_kl", alpha: float = 0.5,
          reference_free: bool = False):
    """SLiC / RSO hinge (Zhao et al. 2023, arXiv 2305.10425 Eq. 1; Liu et al. 2023, arXiv 2309.06657 Eq. 6):
    relu(1 - beta * delta); beta is the inverse margin."""
    rho_w, rho_l, s_w, s_l = _delta(pc, pr, rc, rr, divergence, alpha, reference_free)
    return torch.relu(1.0 - beta * (s_w - s_l)), pair_metrics(beta * rho_w, beta * rho_l)


@register("robust", reference_free_ok=True)
def robust(pc, pr, rc, rr, *, beta: float = 0.1, label_smoothing: float = 0.0,
           divergence: str = "reverse_kl", alpha: float = 0.5, reference_free: bool = False):
    """Robust DPO / rDPO (Chowdhury et al. 2024, arXiv 2403.00409, Eq. 7), label-flip rate eps:
    [-(1-eps) log sigma(beta delta) + eps log sigma(-beta delta)] / (1 - 2 eps). Unbiased, can be negative."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust: label_smoothing (flip rate) must be in [0, 0.5), got {label_smoothing}")
    rho_w, rho_l, s_w, s_l = _delta(pc, pr, rc, rr, divergence, alpha, reference_free)
    x = beta * (s_w - s_l)
    eps = label_smoothing
    loss = (-(1.0 - eps) * F.logsigmoid(x) + eps * F.logsigmoid(-x)) / (1.0 - 2.0 * eps)
    return loss, pair_metrics(beta * rho_w, beta * rho_l)


@register("exo_pair", reference_free_ok=True)
def exo_pair(pc, pr, rc, rr, *, beta: float = 0.1, label_smoothing: float = 1e-3,
             divergence: str = "reverse_kl", alpha: float = 0.5, reference_free: bool = False):
    """EXO, pairwise form (Ji et al. 2024, arXiv 2402.00856, Eq. 16): KL(p_f || p_rh) over {w, l} with
    p_f = softmax(beta * s), p_rh = (1-eps, eps). Needs eps > 0 (log eps)."""
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1 (it takes log eps), got {label_smoothing}")
    rho_w, rho_l, s_w, s_l = _delta(pc, pr, rc, rr, divergence, alpha, reference_free)
    x = beta * (s_w - s_l)
    eps = label_smoothing
    loss = torch.sigmoid(x) * (F.logsigmoid(x) - math.log1p(-eps)) + torch.sigmoid(-x) * (
        F.logsigmoid(-x) - math.log(eps))
    return loss, pair_metrics(beta * rho_w, beta * rho_l)


@register("nca_pair")
def nca_pair(pc, pr, rc, rr, *, beta: float = 0.1):
    """NCA, pairwise (Chen et al. 2024, arXiv 2402.05369, Eq. 12 with K=2):
    -log sigma(r_w) - 0.5 log sigma(-r_w) - 0.5 log sigma(-r_l), r = beta * rho."""
    rho_w, rho_l = log_ratios(pc, pr, rc, rr)
    cw, cl = beta * rho_w, beta * rho_l
    loss = -F.logsigmoid(cw) - 0.5 * F.logsigmoid(-cw) - 0.5 * F.logsigmoid(-cl)
    return loss, pair_metrics(cw, cl)


@register("apo_zero")
def apo_zero(pc, pr, rc, rr, *, beta: float = 0.1):
    """APO-zero (D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7): 1 - sigma(beta rho_w) + sigma(beta rho_l).
    Use when chosen outputs are better than the model's own."""
    rho_w, rho_l = log_ratios(pc, pr, rc, rr)
    loss = 1.0 - torch.sigmoid(beta * rho_w) + torch.sigmoid(beta * rho_l)
    return loss, pair_metrics(beta * rho_w, beta * rho_l)


@register("apo_down")
def apo_down(pc, pr, rc, rr, *, beta: float = 0.1):
    """APO-down (arXiv 2408.06266, Eq. 8): sigma(beta rho_w) + 1 - sigma(beta (rho_w - rho_l)).
    Use when chosen outputs are worse than the model's own."""
    rho_w, rho_l = log_ratios(pc, pr, rc, rr)
    loss = torch.sigmoid(beta * rho_w) + 1.0 - torch.sigmoid(beta * (rho_w - rho_l))
    return loss, pair_metrics(beta * rho_w, beta * rho_l)


@register("sppo_hard")
def sppo_hard(pc, pr, rc, rr, *, beta: float = 0.1):
    """SPPO with hard probabilities (Wu et al. 2024, arXiv 2405.00675, Eq. 4.7 with P(w>l)=1):
    (rho_w - 1/(2 beta))^2 + (rho_l + 1/(2 beta))^2."""
    rho_w, rho_l = log_ratios(pc, pr, rc, rr)
    loss = (rho_w - 0.5 / beta) ** 2 + (rho_l + 0.5 / beta) ** 2
    return loss, pair_metrics(beta * rho_w, beta * rho_l)


class RunningMoments:
    """Running mean/variance of rewards (Chan et al. parallel update): the BCO reward shift delta.

    Accumulation- and order-invariant by construction: a loss reads ``mean`` (the state as of the start
    of the optimiser step) and ``stage``s its detached rewards; the recipe calls ``commit`` once per
    optimiser step, which folds every micro-batch's rewards (summed over ranks by ``reduce_sum``, e.g.
    ``accelerator.reduce``) into the state. So batch 8 x accumulation 1, batch 1 x accumulation 8 and
    2 processes x 4 all see the same delta. Every reward counts once (not one batch mean per batch).
    State is three floats, saved in checkpoints via ``state_dict``.
    """

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24
        self._staged = torch.zeros(3, dtype=torch.float64)  # count, sum, sum of squares

    @torch.no_grad()
    def stage(self, x: Tensor):
        """Remember this micro-batch's rewards (finite values only) for the next ``commit``."""
        x = x.detach().double().flatten()
        x = x[torch.isfinite(x)].cpu()
        self._staged += torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64), x.sum(), (x * x).sum()])

    @torch.no_grad()
    def commit(self, reduce_sum=None) -> float:
        """Fold the staged rewards of this optimiser step (all micro-batches, all ranks) into the state."""
        t = self._staged if reduce_sum is None else reduce_sum(self._staged.clone())
        self._staged = torch.zeros(3, dtype=torch.float64)
        n, s, ss = (float(v) for v in t)
        if n < 1:
            return self.mean
        b_mean = s / n
        b_var = max(ss / n - b_mean**2, 0.0)
        delta = b_mean - self.mean
        tot = self.count + n
        self.mean += delta * n / tot
        m2 = self.var * self.count + b_var * n + delta**2 * self.count * n / tot
        self.var, self.count = m2 / tot, tot
        return self.mean

    def discard(self):
        """Drop the staged rewards (a skipped optimiser step)."""
        self._staged = torch.zeros(3, dtype=torch.float64)

    def update(self, x: Tensor, reduce_sum=None) -> float:
        """``stage`` + ``commit`` in one call (one batch = one optimiser step)."""
        self.stage(x)
        return self.commit(reduce_sum)

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    def load_state_dict(self, d: dict):
        self.mean, self.var, self.count = float(d["mean"]), float(d["var"]), float(d["count"])


@register("bco", uses=("running",))
def bco(pc, pr, rc, rr, *, beta: float = 0.1, shift: float | Tensor | None = None,
        running: RunningMoments | None = None):
    """BCO, pairwise (Jung et al. 2024, arXiv 2404.04656, Eq. 8):
    -log sigma(r_w - delta) - log sigma(-(r_l - delta)), r = beta * rho.

    delta is the running mean of the detached rewards [r_w; r_l] of every *previous* optimiser step
    (``running``: read here, the batch's rewards staged, committed once per optimiser step by the
    recipe -- see ``RunningMoments``). Deviation from TRL v0.28, which updated its running mean with
    the *batch mean* (count + 1 per batch) *before* use in each batch: that makes delta depend on how a
    step is split into micro-batches and on their order; ours weights every reward once and lags one
    optimiser step. TRL HEAD dropped the shift. ``shift`` fixes delta instead; with neither, delta = 0.
    """
    rho_w, rho_l = log_ratios(pc, pr, rc, rr)
    cw, cl = beta * rho_w, beta * rho_l
    if running is not None:
        shift = running.mean
        running.stage(torch.cat([cw, cl]))
    delta = 0.0 if shift is None else shift
    loss = -F.logsigmoid(cw - delta) - F.logsigmoid(-(cl - delta))
    return loss, pair_metrics(cw, cl)


@register("discopop", reference_free_ok=True)
def discopop(pc, pr, rc, rr, *, beta: float = 0.1, tau: float = 0.05, divergence: str = "reverse_kl",
             alpha: float = 0.5, reference_free: bool = False):
    """DiscoPOP / log-ratio modulated loss (Chan Lu et al. 2024, arXiv 2406.08414, Eq. 5):
    x = beta delta, m = sigma(x/tau): (1-m)(-log sigma(x)) + m e^{-x}.
    m e^{-x} is computed as exp(-x + log sigma(x/tau)) so x << 0 stays finite."""
    rho_w, rho_l, s_w, s_l = _delta(pc, pr, rc, rr, divergence, alpha, reference_free)
    x = beta * (s_w - s_l)
    m = torch.sigmoid(x / tau)
    loss = (1.0 - m) * (-F.logsigmoid(x)) + torch.exp(-x + F.logsigmoid(x / tau))
    return loss, pair_metrics(beta * rho_w, beta * rho_l)


@register("sigmoid_norm", uses=("lengths",), reference_free_ok=True)
def sigmoid_norm(pc, pr, rc, rr, *, beta: float = 0.1, chosen_lengths=None, rejected_lengths=None,
                 divergence: str = "reverse_kl", alpha: float = 0.5, reference_free: bool = False):
    """Length-normalised DPO ("DPO w/ LN", SimPO arXiv 2405.14734 App. I; Tulu 3):
    -log sigma(beta (s_w/|y_w| - s_l/|y_l|))."""
    rho_w, rho_l, s_w, s_l = _delta(pc, pr, rc, rr, divergence, alpha, reference_free)
    lw = lengths_or_raise("sigmoid_norm", chosen_lengths, s_w)
    ll = lengths_or_raise("sigmoid_norm", rejected_lengths, s_l)
    loss = -F.logsigmoid(beta * (s_w / lw - s_l / ll))
    return loss, pair_metrics(beta * rho_w, beta * rho_l)


def _sorted_pairs_in_row_order(policy_key: Tensor, ref_key: Tensor) -> Tensor:
    """AOT's d = sort(policy) - sort(reference), returned in *row order*: the row holding the k-th
    smallest policy value gets the k-th smallest reference value subtracted (so per-example losses and
    non-finite reports name the right rows)."""
    order = torch.argsort(policy_key, stable=True)
    d_sorted = policy_key[order] - torch.sort(ref_key).values
    return torch.empty_like(d_sorted).scatter(0, order, d_sorted)


@register("aot", batch_dependent=True)
def aot(pc, pr, rc, rr, *, beta: float = 0.1, label_smoothing: float = 0.0):
    """AOT, paired (Melnyk et al. 2024, arXiv 2406.05882, Eq. 9): sort_batch(c - r) - sort_batch(c0 - r0)
    inside the cDPO form; per-example losses come back in row order.

    The sort runs over the batch it is given, so the loss depends on batch composition
    (``batch_dependent``): the config layer refuses gradient accumulation for it (micro-batches would
    sort separately), and on several processes each sorts its own shard (as TRL does)."""
    pc, pr, rc, rr = check_pairwise(pc, pr, rc, rr)
    rho_w, rho_l = pc - rc, pr - rr
    d = _sorted_pairs_in_row_order(pc - pr, rc - rr)
    return _smoothed_sigmoid(beta * d, label_smoothing), pair_metrics(beta * rho_w, beta * rho_l)


@register("aot_unpaired", batch_dependent=True)
def aot_unpaired(pc, pr, rc, rr, *, beta: float = 0.1, label_smoothing: float = 0.0):
    """AOT, unpaired (arXiv 2406.05882, Eq. 10): sort_batch(rho_w) - sort_batch(rho_l), in row order of
    rho_w (batch-dependent, see ``aot``)."""
    rho_w, rho_l = log_ratios(pc, pr, rc, rr)
    d = _sorted_pairs_in_row_order(rho_w, rho_l)
    return _smoothed_sigmoid(beta * d, label_smoothing), pair_metrics(beta * rho_w, beta * rho_l)


@register("rpo", uses=("lengths",), reference_free_ok=True)
def rpo(pc, pr, rc, rr, *, beta: float = 0.1, sft_weight: float = 1.0, chosen_lengths=None,
        rejected_lengths=None, label_smoothing: float | Tensor = 0.0, reference_free: bool = False):
    """RPO = DPO + SFT on the chosen sample (Pang et al. 2024, arXiv 2404.19733, Eq. 1; Liu et al.
    2024, arXiv 2405.16436): loss = L_DPO + sft_weight * NLL(y_w).

    NLL(y_w) = -pc / |y_w| when lengths are given (Iterative RPO's length normalisation), else -pc.
    For diffusion, pc = -mse(winner), so the term is the winner's denoising MSE. Subject-driven RPO
    (Miao et al. 2024, arXiv 2407.12164, Eq. 8) is this loss with the reference image as "chosen", the
    generated image as "rejected", per-pair soft labels ``label_smoothing = 1 - y`` (y ~ Bernoulli of the
    lambda-harmonic preference) and sft_weight = 1 (the reconstruction term on reference images).
    Deviation from TRL's ``["sigmoid", "sft"]``: TRL takes the token mean over the *whole batch*;
    ours is per sequence, identical when completion lengths are equal.
    """
    loss, metrics = dpo(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing, reference_free=reference_free)
    nll = -as_float(pc)
    if chosen_lengths is not None:
        nll = nll / lengths_or_raise("rpo", chosen_lengths, nll)
    metrics["sft_nll"] = nll.detach()
    return loss + sft_weight * nll, metrics


@register("copg", uses=("reward_margin",))
def copg(pc, pr, rc, rr, *, beta: float = 0.1, reward_margin=None):
    """CoPG, contrastive policy gradient (Flet-Berliac et al. 2024, arXiv 2406.19185, Sec. 4) on a pair
    (y, y') with scalar rewards, off-policy:

        L = (R(y) - R(y') - beta (rho(y) - rho(y')))^2 / (2 beta),     rho = log pi - log pi_ref

    whose gradient is minus CoPG's update, (R_beta(y) - R_beta(y')) (grad log pi(y) - grad log pi(y'))
    with R_beta = R - beta rho: the pair's other sample is the baseline. ``reward_margin`` = R(y) - R(y')
    (any sign: the pair needs no preference order). With R(y) - R(y') = 1/2 it is (beta / 2) x the
    unnormalised IPO loss (rho_w - rho_l - 1/(2 beta))^2 -- same minimiser, gradient scaled by beta / 2."""
    if reward_margin is None:
        raise ValueError("copg needs reward_margin: R(y) - R(y') for every pair (a 'reward_margin' column)")
    rho_w, rho_l = log_ratios(pc, pr, rc, rr)
    m = as_float(torch.as_tensor(reward_margin, device=rho_w.device)).to(rho_w.dtype)
    if m.shape != rho_w.shape:
        raise ValueError(f"copg: reward_margin shape {tuple(m.shape)} != scores shape {tuple(rho_w.shape)}")
    loss = (m - beta * (rho_w - rho_l)) ** 2 / (2.0 * beta)
    return loss, pair_metrics(beta * rho_w, beta * rho_l)


def mm_dpo_beta(beta: float, reward_margin: Tensor, w: float = 0.5, k: float = 0.5) -> Tensor:
    """MM-DPO dynamic beta (MM-RLHF, Zhang et al. 2025, arXiv 2502.10391, Sec. 4.2):
    beta(delta) = beta * (1 + w (1 - exp(-k delta))), delta = clamp(reward margin, 0); in [beta, (1+w) beta].
    beta=0.1, w=0.5, k=0.5: delta=0 -> 0.1, delta=2 -> 0.131606, delta->inf -> 0.15."""
    d = as_float(torch.as_tensor(reward_margin)).detach().clamp(min=0.0)
    return beta * (1.0 + w * (1.0 - torch.exp(-k * d)))


@register("mm_dpo", uses=("reward_margin", "lengths"))
def mm_dpo(pc, pr, rc, rr, *, beta: float = 0.1, reward_margin=None, w: float = 0.5, k: float = 0.5,
           sft_weight: float = 0.0, chosen_lengths=None, rejected_lengths=None):
    """MM-DPO (arXiv 2502.10391, Eq. 6): DPO with a per-pair beta scaled by an external reward-model
    margin (``mm_dpo_beta``, detached), plus ``sft_weight`` (gamma) * NLL(y_w).

    Deviation: the released code's default ``implicit_beta`` replaces the per-pair beta with a batch-level
    one; we implement the paper's per-pair formula. Missing ``reward_margin`` is an error, not beta."""
    if reward_margin is None:
        raise ValueError("mm_dpo needs reward_margin: r(y_w) - r(y_l) from a reward model, one per pair")
    rho_w, rho_l = log_ratios(pc, pr, rc, rr)
    b = mm_dpo_beta(beta, reward_margin, w, k).to(rho_w.device, rho_w.dtype)
    if b.shape != rho_w.shape:
        raise ValueError(f"mm_dpo: reward_margin shape {tuple(b.shape)} != scores shape {tuple(rho_w.shape)}")
    loss = -F.logsigmoid(b * (rho_w - rho_l))
    metrics = pair_metrics(b * rho_w, b * rho_l)
    metrics["beta"] = b
    if sft_weight:
        nll = -as_float(pc)
        if chosen_lengths is not None:
            nll = nll / lengths_or_raise("mm_dpo", chosen_lengths, nll)
        loss = loss + sft_weight * nll
    return loss, metrics


@register("simpo", uses=("lengths",), needs_reference=False)
def simpo(pc, pr, rc=None, rr=None, *, beta: float = 2.0, gamma: float = 0.5, chosen_lengths=None,
          rejected_lengths=None, label_smoothing: float = 0.0):
    """SimPO (Meng et al. 2024, arXiv 2405.14734, Eq. 6), reference-free:
    -log sigma(beta (pc/|y_w| - pr/|y_l|) - gamma). Rewards are the length-normalised beta * log pi."""
    pc_, pr_ = log_ratios(pc, pr, None, None)
    lw = lengths_or_raise("simpo", chosen_lengths, pc_)
    ll = lengths_or_raise("simpo", rejected_lengths, pr_)
    cw, cl = beta * pc_ / lw, beta * pr_ / ll
    return _smoothed_sigmoid(cw - cl - gamma, label_smoothing), pair_metrics(cw, cl)
