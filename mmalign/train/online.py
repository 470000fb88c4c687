"""On-policy rounds inside one training run, for every recipe that can sample (text LMs, VLMs, diffusion and
flow-matching models): the one online driver.

A round, every ``online.steps_per_round`` optimiser steps of the one training loop (``loop.train``): the
recipe's *round source* samples K outputs per prompt from the **current** policy (seeded by (seed, round,
prompt, k)), scores them with the trained reward (``rewards.spec``: ``reward:NAME``, ``world:NAME``,
``py:module:function``, weighted), turns each prompt's group into training rows (best-vs-worst pairs for
pairwise losses, whole groups for group objectives) and writes them to ``<output_dir>/online/round-NNNNN/``
before training on them -- so a run resumed mid-round trains on the very same samples. The optimizer, the LR
schedule, EMA, checkpoints and resume are the loop's, as in an offline run, and the export is the offline one
(``recipe.export_final``: gathered, with its card).

After every round (and on the base model, at step 0) the source evaluates the trained reward and a held-out
**panel** on fixed prompts and seeds; ``online.jsonl`` gets one line per point and the ``Guard`` (``guard.py``)
can stop the run and keep the best point's weights when the trained reward rises while the panel falls.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmalign.data.records import DataError
from mmalign.utils import atomic_folder

from .guard import Guard

# generate(prompts, contexts, k, seed) -> one list of k completions per prompt (text, VLM)
Generate = Callable[[list, list, int, int], list]
# judge(prompt, context, completion) -> float
Judge = Callable[..., float]


class RoundSource(Protocol):
    """What a recipe provides for online rounds."""

    def make_round(self, r: int, step: int, path: Path) -> None:
        """Sample with the current policy, score, write the round's rows under ``path`` (called on every process,
        which share the sampling; the main process writes)."""

    def load_round(self, path: Path):
        """(dataset or None when the round has too few informative rows, statistics dict) of a written round."""

    def evaluate(self, step: int) -> dict:
        """Main process: {"trained": (mean, lo, hi), "panel": {label: (mean, lo, hi)}, "guarded": [labels],
        "metrics": {name: float}} on the fixed held-out prompts and seeds; {} when the source has no panel."""


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


class OnlineRounds:
    """The rounds of one online run, driven by ``loop.train``: ``data_for(r, step)`` at each round's first step,
    ``evaluate(step)`` at step 0 and at each round's end (trained reward, panel, guard, ``online.jsonl``)."""

    def __init__(self, source: RoundSource, rounds: int, steps_per_round: int, batch_rows: int, output_dir: str,
                 acc, guard: Guard | None = None, keep_best: Callable | None = None):
        """``batch_rows``: rows one optimiser step needs on all processes; ``keep_best``: (save, load) of the
        trainable weights, for the guard's best point."""
        self.source, self.rounds, self.spr, self.batch_rows = source, rounds, steps_per_round, batch_rows
        self.dir, self.acc, self.guard = Path(output_dir) / "online", acc, guard or Guard(patience=0)
        self.keep_best = keep_best
        self.round_stats: dict[int, dict] = {}
        self.log = None  # MetricsLog of online.jsonl, opened by the loop (it knows the resumed step)

    def round_dir(self, r: int) -> Path:
        return self.dir / f"round-{r:05d}"

    def data_for(self, r: int, step: int):
        """The training rows of round ``r``: read back when the round was written before (a resumed run), else
        sampled now with the current policy. ``None`` when the round gave too few informative rows."""
        path = self.round_dir(r)
        if not (path / "stats.json").exists():
            self.source.make_round(r, step, path)
        self.acc.wait_for_everyone()
        data, stats = self.source.load_round(path)
        self.round_stats[r] = stats
        n = 0 if data is None else len(data)
        self.acc.print(f"online round {r}: {stats.get('rows', n)} rows from {stats.get('samples', '?')} samples, "
                       f"mean reward {stats.get('mean_reward', float('nan')):.4f}"
                       + (" (read back from an earlier run)" if stats.get("step") != step else ""))
        if n < self.batch_rows:
            msg = (f"online round {r}: only {n} informative rows (a prompt whose samples all score the same gives "
                   f"none); one optimiser step needs {self.batch_rows}. Raise online.samples or the prompts, lower "
                   "train.batch_size, or use a reward that separates the samples")
            if r == 0:
                raise DataError(msg)
            self.acc.print(msg + "; stopping here")
            return None
        return data

    def evaluate(self, step: int) -> dict:
        """Trained reward and panel after the round that ends at ``step`` (the base model at 0); guard; log."""
        t0 = time.perf_counter()
        res = self.source.evaluate(step) if self.acc.is_main_process else {}
        out = dict(res.get("metrics", {}))
        r = step // self.spr - 1
        rec = {"step": step, "round": r, "images_sampled": sum(s.get("samples", 0) for q, s in self.round_stats.items()
                                                                if q <= r),
               **({"sampled": self.round_stats[r]} if r in self.round_stats else {})}
        if "trained" in res:
            guarded = {k: v for k, v in res["panel"].items() if k in res.get("guarded", res["panel"])}
            state = self.guard.update(step, res["trained"], guarded)
            rec.update(trained=list(res["trained"]), panel={k: list(v) for k, v in res["panel"].items()}, guard=state)
            out["guard_streak"] = float(state["streak"])
        if self.acc.num_processes > 1:  # the main process evaluated: every process takes its guard state
            from accelerate.utils import broadcast_object_list  # torch.distributed: only in multi-process runs

            self.guard.load_state_dict(broadcast_object_list([self.guard.state_dict()])[0])
        if self.guard.patience and self.guard.best_is_latest and self.keep_best is not None:
            self.keep_best[0](self.dir / "best.safetensors")  # written by the main process
        rec["eval_seconds"] = round(time.perf_counter() - t0, 2)
        if self.log is not None:
            self.log.write(rec)
        return out

    @property
    def stop(self) -> bool:
        return self.guard.stopped

    def finish(self) -> list[dict]:
        """After the last round: on a guard stop, load the best point's weights (saved when it was reached) for
        the export; plot ``online.png`` from ``online.jsonl``. Returns the rounds' sampling statistics."""
        best = self.dir / "best.safetensors"
        if self.guard.stopped and not self.guard.best_is_latest and self.keep_best is not None and best.exists():
            self.keep_best[1](best)
            p = self.guard.points[self.guard.best_point]
            self.acc.print(f"guard: the trained reward rose while the panel fell for {self.guard.patience} rounds; "
                           f"keeping the weights of step {p['step']} (trained reward {p['trained'][0]:.4f})")
        if self.acc.is_main_process and self.log is not None and self.guard.points:
            plot_online(self.log.path, self.log.path.with_suffix(".png"))
        return [{"round": r, **s} for r, s in sorted(self.round_stats.items())]

    def state_dict(self) -> dict:
        return {"guard": self.guard.state_dict(), "round_stats": {str(k): v for k, v in self.round_stats.items()}}

    def load_state_dict(self, s: dict | None):
        if s:
            self.guard.load_state_dict(s["guard"])
            self.round_stats = {int(k): v for k, v in s.get("round_stats", {}).items()}


def weight_keeper(recipe) -> tuple[Callable, Callable]:
    """(save(path), load(path)) of the recipe's trainable weights, for the guard's best point."""
    def save(path: Path):
        if recipe.acc.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({k: v.detach().contiguous().cpu() for k, v in recipe.trainable_state().items()}, str(tmp))
            os.replace(tmp, path)

    def load(path: Path):
        recipe.acc.wait_for_everyone()
        recipe.load_trainable_state({k: v.to(torch.float32) if v.is_floating_point() else v
                                     for k, v in load_file(str(path)).items()})

    return save, load


class CompletionRounds:
    """The ``RoundSource`` of text and VLM recipes: ``generate`` K completions per prompt (and context: an image
    for VLMs) with the current policy, ``judge`` each, ``rows_fn`` turns each group into rows written as
    ``rows.parquet`` (``write_rows`` for rows that carry images). Every process generates (sharded models need all
    of them in the forward); the main process writes. Seeds per round: ``seed * 1000 + round * 100_003``."""

    def __init__(self, acc, policy, generate: Generate, judge: Judge, prompts: list, contexts: list, samples: int,
                 seed: int, make_data: Callable, rows_fn: Callable = best_worst_pairs,
                 write_rows: Callable[[list[dict], Path], None] | None = None):
        self.acc, self.policy, self.generate, self.judge = acc, policy, generate, judge
        self.prompts, self.contexts, self.samples, self.seed = prompts, contexts, samples, seed
        self.make_data, self.rows_fn, self.write_rows = make_data, rows_fn, write_rows

    def make_round(self, r: int, step: int, path: Path) -> None:
        was = self.policy.training
        self.policy.eval()
        try:
            rows, stats = sample_rows(self.generate, self.judge, self.prompts, self.contexts, self.samples,
                                      self.seed * 1000 + r * 100_003, self.rows_fn)
        finally:
            self.policy.train(was)
        if not self.acc.is_main_process:
            return
        with atomic_folder(path) as tmp:  # a kill while writing leaves no round that looks finished
            if rows and self.write_rows is not None:
                self.write_rows(rows, tmp / "rows.parquet")
            elif rows:
                import datasets  # the parquet writer, loaded when a round has rows

                datasets.Dataset.from_list(rows).to_parquet(str(tmp / "rows.parquet"))
            (tmp / "stats.json").write_text(json.dumps({**stats, "step": step, "round": r}))

    def load_round(self, path: Path):
        stats = json.loads((path / "stats.json").read_text())
        return (self.make_data(path / "rows.parquet") if stats["rows"] else None), stats

    def evaluate(self, step: int) -> dict:
        return {}  # the recipe's own evaluation (eval pairs, the reward on eval_prompts) covers text and VLMs


def plot_online(jsonl: Path, out: Path):
    """One panel per reported entry (the trained reward, then the panel): mean and 95% interval per evaluation
    point against the images sampled so far (step when unknown); the guard's stop and best point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in (json.loads(x) for x in jsonl.read_text().splitlines() if x.strip()) if "trained" in r]
    if not recs:
        return
    names = ["trained reward"] + list(recs[-1]["panel"])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.0), squeeze=False)
    steps = [r["step"] for r in recs]
    stop = next((r["step"] for r in recs if r.get("guard", {}).get("stop")), None)
    best = recs[-1].get("guard", {}).get("best_step")
    for ax, name in zip(axes[0], names):
        v = np.array([r["trained"] if name == "trained reward" else r["panel"].get(name, [np.nan] * 3) for r in recs],
                     dtype=float)
        ax.plot(steps, v[:, 0], "o-", color="C0" if name == "trained reward" else "C1")
        ax.fill_between(steps, v[:, 1], v[:, 2], alpha=0.25, color="C0" if name == "trained reward" else "C1")
        if stop is not None:
            ax.axvline(stop, color="red", ls="--", lw=1, label="guard stop")
        if best is not None:
            ax.axvline(best, color="green", ls=":", lw=1, label="kept")
        ax.set(title=name, xlabel="step")
    if stop is not None or best is not None:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
