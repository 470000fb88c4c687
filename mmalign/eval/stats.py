"""Base-vs-tuned statistics (``mmalign eval``, the demo, the online panel).

Images are compared in pairs: the same prompt and seed, base model vs a tuned model. For each reward:
mean score per model with a 95% percentile-bootstrap interval, and the win rate of the tuned model over
the base (ties count half) with a bootstrap interval over the paired items -- how the Diffusion-DPO
family of papers report PickScore / HPSv2 / ImageReward / aesthetic / CLIPScore results.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

BOOTSTRAP = 2000


def bootstrap_ci(values, stat=np.mean, n: int = BOOTSTRAP, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over ``values`` (seeded, so reports reproduce)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n, len(v)))
    stats = np.array([stat(v[i]) for i in idx]) if stat is not np.mean else v[idx].mean(axis=1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def wins(tuned, base) -> np.ndarray:
    """Per item: 1 if tuned > base, 0.5 on a tie, 0 otherwise."""
    t, b = np.asarray(tuned, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if t.shape != b.shape:
        raise ValueError(f"paired scores differ in length: {t.shape} vs {b.shape}")
    return (t > b) + 0.5 * (t == b)


def summarize_scores(scores: dict[str, dict[str, list[float]]], base: str = "base", seed: int = 0) -> list[dict]:
    """``scores[model][reward]`` (paired item lists) -> one row per (reward, model): mean, 95% interval and,
    for models other than ``base``, the win rate vs base with its interval."""
    rows = []
    rewards = list(next(iter(scores.values())))
    for r in rewards:
        for m, by in scores.items():
            v = by[r]
            lo, hi = bootstrap_ci(v, seed=seed)
            row = {"reward": r, "model": m, "n": len(v), "mean": float(np.mean(v)), "ci_low": lo, "ci_high": hi}
            if m != base:
                w = wins(v, scores[base][r])
                wl, wh = bootstrap_ci(w, seed=seed + 1)
                row.update(win_rate=float(w.mean()), win_low=wl, win_high=wh)
            rows.append(row)
    return rows


def diversity_rows(images: dict[str, list], keys: list[tuple[str, int]], base: str, seed: int = 0,
                   measure=None, name: str = "diversity") -> list[dict]:
    """Per-prompt sample diversity (``measure`` of a prompt's images over its seeds: by default the pixel-space
    ``mmalign.rewards.signals.diversity``; ``dino_diversity`` for a semantic one) for every model: mean over prompts
    with its 95 % interval; for other models the share of prompts more diverse than base and ``fell``: True when its
    whole interval lies below the base's (collapsed diversity, a reward-hacking sign; two intervals that overlap
    are not evidence). Rows named ``name``; empty when no prompt has two seeds."""
    from mmalign.rewards.signals import diversity  # lazy: signals imports torch, which report-only users skip

    measure = measure or diversity

    by_prompt: dict[str, list[int]] = {}
    for i, (prompt, _) in enumerate(keys):
        by_prompt.setdefault(prompt, []).append(i)
    groups = [ix for ix in by_prompt.values() if len(ix) >= 2]
    if not groups:
        return []
    per = {m: [measure([ims[i] for i in ix]) for ix in groups] for m, ims in images.items()}
    rows = []
    for m in [base] + [m for m in per if m != base]:
        v = per[m]
        lo, hi = bootstrap_ci(v, seed=seed)
        row = {"reward": name, "model": m, "n": len(v), "mean": float(np.mean(v)), "ci_low": lo, "ci_high": hi}
        if m != base:
            w = wins(v, per[base])
            wl, wh = bootstrap_ci(w, seed=seed + 1)
            row.update(win_rate=float(w.mean()), win_low=wl, win_high=wh, fell=bool(hi < rows[0]["ci_low"]))
        rows.append(row)  # rows[0] is the base's
    return rows


def fidelity_rows(folders: dict[str, str | Path], reference: str | Path, weights: str | None = None,
                  device=None) -> list[dict]:
    """FID and KID of every model's folder against ``reference`` (``mmalign.rewards.signals.fid_kid``, through
    torch-fidelity): set statistics, one row each, lower is closer."""
    from mmalign.rewards.signals import fid_kid  # lazy: torch-fidelity is only needed when asked for

    rows = []
    for m, folder in folders.items():
        r = fid_kid(folder, reference, weights, device)
        common = {"model": m, "n": r["images"], "reference_images": r["reference_images"]}
        rows += [{"reward": "fid", "mean": r["fid"], **common},
                 {"reward": "kid", "mean": r["kid"], "std": r["kid_std"], **common}]
    return rows
