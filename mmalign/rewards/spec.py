"""One way to name a reward, everywhere (online rounds of every modality, their panels, judges):

    reward:NAME            a ``REWARDS`` entry (``reward:pickscore``, ``reward:toy_clip``, ``reward:saturation``)
    world:NAME             a plug-in world's oracle (``world:shapes``; ``mmalign.worlds``)
    py:module:function     your own Python function

Several are combined with ``+``, each with an optional weight: ``"0.7*reward:pickscore + 0.3*reward:hpsv2"``.
``parse_reward_spec`` checks the names (unknown rewards, worlds and functions are one ``ConfigError`` naming
the config key) without loading any model; ``load_image_rewards`` loads them for scoring images.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from mmalign.config import ConfigError
from mmalign.data.records import DataError
from mmalign.worlds import get_world

from .models import REWARDS, load_reward

KINDS = ("reward", "world", "py")


@dataclass(frozen=True)
class RewardTerm:
    weight: float
    kind: str  # reward | world | py
    name: str  # REWARDS name, world name, or module:function

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.name}"


def parse_reward_spec(spec: str, key: str) -> list[RewardTerm]:
    """``"0.5*reward:toy_clip + world:shapes"`` -> terms; a clear ``ConfigError`` naming ``key`` otherwise."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"{key}: name a reward as reward:NAME, world:NAME or py:module:function (got {spec!r})")
    terms = []
    for part in spec.split("+"):
        part = part.strip()
        m = re.fullmatch(r"(?:([0-9.eE+-]+)\s*\*\s*)?(\w+):(.+)", part)
        if not m or m.group(2) not in KINDS:
            raise ConfigError(f"{key}: {part!r} is not reward:NAME, world:NAME or py:module:function "
                              "(several joined by +, each optionally weighted as 0.5*reward:NAME)")
        try:
            weight = float(m.group(1)) if m.group(1) else 1.0
        except ValueError:
            raise ConfigError(f"{key}: {part!r}: the weight {m.group(1)!r} is not a number") from None
        term = RewardTerm(weight, m.group(2), m.group(3).strip())
        _check_name(term, key)
        terms.append(term)
    labels = [t.label for t in terms]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"{key}: {spec!r} names a reward twice")
    return terms


def _check_name(t: RewardTerm, key: str):
    if t.kind == "reward":
        if t.name not in REWARDS:
            raise ConfigError(f"{key}: unknown reward {t.name!r}; known: {', '.join(sorted(REWARDS))}")
    elif t.kind == "world":
        try:
            get_world(t.name)
        except KeyError as e:
            raise ConfigError(f"{key}: {e.args[0]}") from None
    else:
        load_function(t.name, key)


def load_function(spec: str, key: str) -> Callable:
    """``module:function`` -> the function (user code)."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{key}: py:{spec} cannot be imported ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(f"{key}: py:{spec} is not a function")
    return fn


def needs_prompts(t: RewardTerm) -> bool:
    """Does this term read the prompts (every world oracle does; a ``py:`` function always receives them)?"""
    if t.kind == "reward":
        return REWARDS[t.name].needs_prompts
    return t.kind == "world"


class ImageRewards:
    """Loaded terms of an image reward spec: ``scores(images, prompts)`` -> {label: [N] array} and
    ``combine(scores, groups)`` -> the weighted sum, each term first normalised within its group when asked."""

    def __init__(self, terms: list[RewardTerm], fns: list[Callable]):
        self.terms, self.fns = terms, fns

    @property
    def labels(self) -> list[str]:
        return [t.label for t in self.terms]

    def scores(self, images, prompts: list[str]) -> dict[str, np.ndarray]:
        """Every term's scores; a NaN or infinite score is an error, never a training signal (``diversity`` gives
        NaN to an image with no sibling of its prompt in the call)."""
        out = {t.label: np.asarray(fn(images, prompts), dtype=np.float64) for t, fn in zip(self.terms, self.fns)}
        for label, s in out.items():
            if not np.isfinite(s).all():
                raise DataError(f"{label}: {int((~np.isfinite(s)).sum())} of {len(s)} scores are NaN or "
                                "infinite (a set reward such as diversity needs two or more images per prompt)")
        return out

    def combine(self, scores: dict[str, np.ndarray], groups: list[list[int]] | None = None) -> np.ndarray:
        """sum_i w_i * s_i; with ``groups`` (index lists, one per prompt) each s_i is z-scored within the group
        first (std + 1e-8; a group whose scores are all equal contributes 0), so rewards on different scales
        weigh as their weights say."""
        total = np.zeros(len(next(iter(scores.values()))))
        for t in self.terms:
            s = scores[t.label].copy()
            if groups is not None:
                for g in groups:
                    v = s[g]
                    s[g] = (v - v.mean()) / (v.std() + 1e-8)
            total += t.weight * s
        return total


def load_image_rewards(spec: str, key: str, device=None, models: dict | None = None, tiny: bool = False) -> ImageRewards:
    """Load every term of ``spec`` for scoring images: ``fn(images, prompts) -> [N]``. ``models``: weights per
    REWARDS name (``{"hpsv2": path}``); ``tiny``: random tiny reward weights (tests)."""
    terms, fns = parse_reward_spec(spec, key), []
    for t in terms:
        if t.kind == "reward":
            rw = load_reward(t.name, model=(models or {}).get(t.name), device=device, tiny=tiny)
            fns.append(lambda ims, ps, rw=rw: rw.score(ims, ps if rw.needs_prompts else None).numpy())
        elif t.kind == "world":
            w = get_world(t.name)
            fns.append(lambda ims, ps, w=w: w.reward(ims, ps))
        else:
            fns.append(load_function(t.name, key))
    return ImageRewards(terms, fns)
