"""Reward transformation for aligning to several rewards (Wang et al. 2024, "Transforming and Combining
Rewards for Aligning Large Language Models", arXiv 2402.00742, Eq. 5-6):

    u(x, y) = sum_m log sigma(r_m(x, y) - r_ref,m(x))

Each reward is centred on a per-prompt reference value (e.g. the median reward of the base policy's samples
for that prompt) and passed through log-sigmoid: improving an already good response earns little, fixing a
bad one earns a lot, and summing transformed rewards acts as a logical AND (every reward must be met).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def transformed_reward(rewards: Tensor, reference: Tensor) -> Tensor:
    """``rewards`` ``[..., M]`` (M reward models) and ``reference`` broadcastable to it -> ``[...]``."""
    r = torch.as_tensor(rewards)
    r = r if r.is_floating_point() else r.float()
    ref = torch.as_tensor(reference, device=r.device).to(r.dtype)
    if r.dim() == 0:
        raise ValueError("rewards need a last dimension of reward models, e.g. [N, 1] for one reward")
    return F.logsigmoid(r - ref).sum(-1)


def reference_rewards(group_rewards: Tensor, quantile: float = 0.5) -> Tensor:
    """Per-prompt reference: the ``quantile`` of the base policy's sample rewards ``[B, K, M]`` -> ``[B, M]``
    (the paper uses a quantile of reference-policy samples; 0.5 is the median)."""
    return torch.quantile(torch.as_tensor(group_rewards, dtype=torch.float32), quantile, dim=1)
