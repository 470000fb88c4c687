"""The shared preference-loss core: pure tensor functions, one registry.

>>> from mmalign.losses import LOSSES
>>> loss, metrics = LOSSES["dpo"](pc, pr, rc, rr, beta=0.1)

See ``LOSSES`` for the calling convention of each ``kind``.
"""
from . import group, listwise, pairwise, rl, tokenwise, unpaired  # noqa: F401  (registers the losses)
from ._common import DIVERGENCES, LOSSES, f_score
from .pairwise import RunningMoments, mm_dpo_beta
from .reduce import MetricSums, backward_loss
from .rl import group_advantages, nft_r
from .tokenwise import activation_mask, ld_sequence_scores, token_kl
from .unpaired import kto_kl


def get_loss(name: str):
    """``LOSSES[name]``; unknown names raise ``KeyError`` listing the known ones."""
    return LOSSES[name]


def loss_table() -> list[tuple[str, str, str]]:
    """(name, kind, first docstring line) for every registered loss -- used by ``mmalign losses``."""
    rows = []
    for name in sorted(LOSSES):
        fn = LOSSES[name]
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        rows.append((name, fn.kind, doc))
    return rows


__all__ = ["LOSSES", "DIVERGENCES", "f_score", "get_loss", "loss_table", "RunningMoments", "mm_dpo_beta",
           "MetricSums", "backward_loss", "activation_mask", "ld_sequence_scores", "token_kl", "kto_kl",
           "group_advantages", "nft_r"]
