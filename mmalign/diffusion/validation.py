"""Validation during diffusion training: sample grids from fixed prompts and seeds, an optional reward on
them, and reward-based checkpoint selection with early stopping (RPO's model selection).

``Validator.run(step)`` samples (main process only), saves ``<output_dir>/samples/step-N.png``, logs the
images to tensorboard, scores them with the configured reward (or a scorer the caller passes), exports
``<output_dir>/best`` on improvement when ``select_best`` and sets ``stop`` after ``patience`` evaluations
without one.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from mmalign.data.images import list_images, read_images
from mmalign.rewards import load_reward

from .data import make_grid
from .options import ValidationOptions


def reward_scorer(section: ValidationOptions, device) -> Callable | None:
    """``validation.reward`` (a REWARDS name) as ``fn(images, prompts) -> list[float]``, or None."""
    if section.reward is None:
        return None

    reward = load_reward(section.reward, model=section.reward_model, device=device, **section.reward_args)
    refs = read_images(list_images(section.references))[1] if section.references else None
    if reward.needs_references and not refs:
        raise ValueError(f"validation.reward={section.reward} needs validation.references (a folder of images)")
    return lambda images, prompts: reward.score(images, prompts if reward.needs_prompts else None, refs).tolist()


class Validator:
    def __init__(self, section: ValidationOptions, resolution: int, output_dir: str, sample_fn: Callable, export_fn: Callable,
                 scorer: Callable | None = None):
        """``sample_fn(prompts, seeds, steps, guidance, resolution) -> images``; ``export_fn(path, card)``."""
        self.v, self.resolution = section, resolution
        self.samples_dir = Path(output_dir) / "samples"
        self.best_dir = Path(output_dir) / "best"
        self.sample_fn, self.export_fn, self.scorer = sample_fn, export_fn, scorer
        self.best_reward, self.best_step, self.evals_since_best, self.stop = -math.inf, None, 0, False

    @property
    def enabled(self) -> bool:
        return bool(self.v.prompts)

    def run(self, step: int, trackers=()) -> dict:
        v = self.v
        prompts = [p for p in v.prompts for _ in range(v.images_per_prompt)]
        seeds = [v.seed + j for _ in v.prompts for j in range(v.images_per_prompt)]
        images = self.sample_fn(prompts, seeds, v.num_inference_steps, v.guidance_scale,
                                v.resolution or self.resolution)
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        grid = make_grid(images, cols=v.images_per_prompt * min(4, len(v.prompts)), labels=prompts)
        grid.save(self.samples_dir / f"step-{step:08d}.png")
        for tracker in trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step,
                                          dataformats="NHWC")
        out = {}
        if self.scorer is not None:
            scores = self.scorer(images, prompts)
            out["reward"] = float(sum(scores) / len(scores))
            self.select(step, out["reward"])
        return out

    def select(self, step: int, reward: float):
        """Export to ``best`` on improvement (``select_best``); stop after ``patience`` evaluations without."""
        v = self.v
        if reward > self.best_reward:
            self.best_reward, self.best_step, self.evals_since_best = reward, step, 0
            if v.select_best:
                self.export_fn(self.best_dir, {"step": step, "reward": round(reward, 5)})
        else:
            self.evals_since_best += 1
            if v.patience and self.evals_since_best >= v.patience:
                self.stop = True
                print(f"early stop at step {step}: no reward improvement in {v.patience} evaluations "
                      f"(best {self.best_reward:.4f} at step {self.best_step})", flush=True)
