"""Bundled image reward models: ``REWARDS`` registry, ``load_reward``, and ``mmalign score``."""
from . import hpsv3, imagereward, judge, signals  # noqa: F401  (register "hpsv3", "imagereward", "vqascore", ...)
from .models import (
    REWARDS,
    AestheticMLP,
    Reward,
    lambda_harmonic,
    load_reward,
    reward_table,
)

__all__ = ["REWARDS", "Reward", "load_reward", "lambda_harmonic", "reward_table", "AestheticMLP"]
