"""On-policy rounds, shared by every recipe that can sample its own completions (text LMs, VLMs).

A round: for every prompt, sample ``samples`` completions from the *current* policy, score each with a
judge / reward (a Python callable), turn the scored group into training rows, train
``steps_per_round`` steps through the one loop, evaluate. ``rows_fn`` decides what a group becomes:
best vs worst pairs (online DPO, MM-DPO margins) or whole groups (DisCO, f-DPG, HyPO's KL samples).
Sampling is seeded per (seed, round, prompt), so a run reproduces.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np

from .loop import TrainResult, eval_summary, train

# generate(prompts, contexts, k, seed) -> one list of k completions per prompt
Generate = Callable[[list, list, int, int], list]
# judge(prompt, context, completion) -> float
Judge = Callable[..., float]


def best_worst_pairs(prompt, context, completions: list[str], scores: list[float]) -> list[dict]:
    """Online DPO: the best and the worst completion of a prompt, with the judge's margin (``mm_dpo``);
    nothing when every completion scored the same (no preference) or one is empty."""
    hi, lo = int(np.argmax(scores)), int(np.argmin(scores))
    if scores[hi] <= scores[lo] or not completions[hi].strip() or not completions[lo].strip():
        return []
    return [{"prompt": prompt, "chosen": completions[hi], "rejected": completions[lo],
             "reward_margin": float(scores[hi] - scores[lo])}]


def sample_rows(generate: Generate, judge: Judge, prompts: list, contexts: list, samples: int, seed: int,
                rows_fn: Callable = best_worst_pairs) -> tuple[list[dict], dict]:
    """Sample, judge and turn every prompt's group into rows; returns (rows, round statistics)."""
    groups = generate(prompts, contexts, samples, seed)
    rows, all_scores = [], []
    for p, c, comps in zip(prompts, contexts, groups):
        scores = [float(judge(p, c, y)) for y in comps]
        all_scores += scores
        rows += rows_fn(p, c, comps, scores)
    stats = {"samples": len(all_scores), "mean_reward": float(np.mean(all_scores)) if all_scores else float("nan"),
             "rows": len(rows)}
    if rows and "reward_margin" in rows[0]:
        stats["mean_margin"] = float(np.mean([r["reward_margin"] for r in rows]))
    return rows, stats


def run_rounds(recipe, cfg, online, acc, generate: Generate, judge: Judge, prompts: list, contexts: list,
               make_data: Callable[[Path], object], rows_fn: Callable = best_worst_pairs,
               write_rows: Callable[[list[dict], Path], None] | None = None, config: dict | None = None) -> TrainResult:
    """``online.rounds`` rounds of sample -> judge -> rows -> ``steps_per_round`` training steps -> evaluate.
    ``make_data(path)`` builds the recipe's dataset from a round's parquet file. Returns the last round's
    ``TrainResult`` with ``online`` (per-round statistics) and the evaluation history over all rounds."""
    import datasets

    out = Path(cfg.train.output_dir)
    log, evals, done, result = [], [], 0, None
    if cfg.train.eval_every:
        evals.append({"step": 0, **{f"eval/{k}": v for k, v in recipe.evaluate(0).items()}})
    for r in range(online.rounds):
        was = recipe.policy.training
        recipe.policy.eval()
        rows, stats = sample_rows(generate, judge, prompts, contexts, online.samples,
                                  cfg.train.seed * 1000 + r * 100_003, rows_fn)
        recipe.policy.train(was)
        if len(rows) < cfg.train.batch_size:
            if result is None:
                raise RuntimeError(
                    f"online round 0: only {len(rows)} informative rows (the judge scored the sampled completions "
                    f"of a prompt equally); need at least train.batch_size={cfg.train.batch_size}. Raise "
                    "online.samples / online.temperature or start from a model that can answer.")
            print(f"online round {r}: only {len(rows)} informative rows; stopping", flush=True)
            break
        path = out / f"online_round{r}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        if write_rows is not None:
            write_rows(rows, path)
        else:
            datasets.Dataset.from_list(rows).to_parquet(str(path))
        recipe.train_data = make_data(path)
        tc = dataclasses.replace(cfg.train, max_steps=online.steps_per_round, output_dir=str(out / f"round{r}"),
                                 eval_every=0, resume=None)
        result = train(recipe, tc, acc, config=config)
        done += result.step
        log.append({"round": r, **stats})
        print(f"online round {r}: {stats['rows']} rows from {stats['samples']} samples, mean reward "
              f"{stats['mean_reward']:.3f}", flush=True)
        if cfg.train.eval_every:  # evaluation after every round, at the cumulative step
            evals.append({"step": done, **{f"eval/{k}": v for k, v in recipe.evaluate(done).items()}})
            log[-1].update({k: v for k, v in evals[-1].items() if k != "step"})
    (out / "online.json").write_text(json.dumps(log))
    result.online, result.eval_history, result.step = log, evals, done
    final = eval_summary(result, acc)
    recipe.export(out / "final", card=final)
    result.recipe = recipe
    return result
