"""The one reduction every recipe uses (torchtitan-style: sum, then divide by a global count).

Losses return unreduced per-example values. For one optimiser step made of several micro-batches on
several ranks, each micro-batch contributes ``sum(per_example) * world_size / global_count`` to
``backward``. DDP averages gradients over ranks, so the applied gradient is exactly the mean over
every example of the step -- which is why batch 8 x accumulation 1 equals batch 1 x accumulation 8,
and 2 processes equal 1 process at the same global batch.
"""
from __future__ import annotations

from collections import defaultdict

import torch

Tensor = torch.Tensor


def backward_loss(per_example: Tensor, global_count: float, world_size: int = 1) -> Tensor:
    """Scalar to call ``backward`` on for one micro-batch (see module docstring)."""
    if global_count <= 0:
        raise ValueError("global_count must be positive")
    return per_example.sum() * (world_size / float(global_count))


class MetricSums:
    """Accumulates per-example metrics over micro-batches; ``means`` all-reduces sums and counts."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)

    @torch.no_grad()
    def add(self, metrics: dict[str, Tensor], loss: Tensor | None = None):
        items = dict(metrics)
        if loss is not None:
            items["loss"] = loss
        for k, v in items.items():
            v = v.detach().float()
            finite = torch.isfinite(v)
            self.sums[k] += float(v[finite].sum()) if v.dim() else (float(v) if bool(finite) else 0.0)
            self.counts[k] += float(finite.sum()) if v.dim() else float(bool(finite))

    def means(self, reduce_sum=None) -> dict[str, float]:
        """``reduce_sum``: a function summing a 1-D tensor across ranks (``accelerator.reduce``)."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        t = torch.tensor([self.sums[k] for k in keys] + [self.counts[k] for k in keys], dtype=torch.float64)
        if reduce_sum is not None:
            t = reduce_sum(t)
        n = len(keys)
        return {k: (t[i] / t[n + i]).item() if t[n + i] > 0 else float("nan") for i, k in enumerate(keys)}
