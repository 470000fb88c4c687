"""Group RL for diffusion and flow models: the rounds and batches of GRPO / DiffusionNFT / AWM (``loss.name``
grpo, nft or awm with ``online:``), for UNets and flow transformers alike.

A round (``RLRounds.make_round``) samples K images per prompt with ``StepSampler`` -- our own loop of the family's
sampler (flow-matching Euler / DDIM), stochastic on a window of steps for GRPO so that each window step's
Gaussian log-density is recorded (fp32), plain ODE for NFT / AWM (solver-agnostic: they train on final latents
only) -- from the current policy (GRPO, AWM) or the slow "old" policy (NFT, as its authors sample). Images are
decoded once for the reward; each sample's advantage is its reward minus its prompt group's mean over the std
(``losses.group_advantages``; equal rewards give 0). The round keeps final latents, advantages and, for GRPO, the
window's (x_i, x_{i+1}, log p, step index).

``OldPolicy`` is the slow copy of the trainable weights: NFT's sampling and v_old policy, AWM's KL anchor;
after each round old <- lam old + (1 - lam) theta with lam = min(rate x step, max) (NFT: rate 1e-3, max 0.5;
AWM's anchor: max 0.3).
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmalign.data.text import _Batch
from mmalign.losses import group_advantages
from mmalign.utils import atomic_folder

from .online import DiffusionRounds, rollout_seed
from .sampler import StepSampler

Tensor = torch.Tensor
RL_KINDS = ("policy_ratio", "flow_ratio", "flow_mix")


@dataclass
class SampleBatch(_Batch):
    latents: Tensor  # [B, C, h, w] final samples
    captions: list
    advantages: Tensor  # [B]
    index: Tensor  # [B] rows of the round
    steps: Optional[Tensor] = None  # [B, W] sampler step of each recorded window step (GRPO)
    x: Optional[Tensor] = None  # [B, W, C, h, w] latents before the step
    x_next: Optional[Tensor] = None  # [B, W, C, h, w] the drawn next latents
    old_logp: Optional[Tensor] = None  # [B, W] their log-density under the sampling policy
    skipped: int = 0

    def __len__(self):
        return len(self.index)


class SampleRows(torch.utils.data.Dataset):
    """One round's samples (every sample is a row: group objectives learn from the whole group)."""

    def __init__(self, tensors: dict, prompts: list[str], label: str = ""):
        self.t, self.prompts, self.label = tensors, prompts, label

    def __len__(self):
        return len(self.prompts)

    def describe(self) -> str:
        return f"{len(self)} online samples{self.label}"

    def __getitem__(self, i):
        return int(i)

    def collate(self, idx: list) -> SampleBatch:
        ix = torch.tensor(idx, dtype=torch.long)
        t = self.t
        pick = lambda k: t[k][ix] if k in t else None  # noqa: E731
        return SampleBatch(t["latents"][ix], [self.prompts[i] for i in idx], t["advantages"][ix], ix,
                           pick("steps"), pick("x"), pick("x_next"), pick("old_logp"))


class OldPolicy:
    """A slow copy of the trainable weights (see the module docstring); ``swapped()`` runs the module with it."""

    def __init__(self, params: list[tuple[str, torch.nn.Parameter]]):
        self.params = params
        self.old = [p.detach().clone() for _, p in params]

    @torch.no_grad()
    def update(self, lam: float):
        for o, (_, p) in zip(self.old, self.params):
            o.mul_(lam).add_(p.detach(), alpha=1.0 - lam)

    @contextlib.contextmanager
    def swapped(self):
        keep = [p.detach().clone() for _, p in self.params]
        with torch.no_grad():
            for (_, p), o in zip(self.params, self.old):
                p.copy_(o)
        try:
            yield
        finally:
            with torch.no_grad():
                for (_, p), k in zip(self.params, keep):
                    p.copy_(k)

    def state(self) -> dict[str, Tensor]:
        return {f"old/{n}": o for (n, _), o in zip(self.params, self.old)}

    def load(self, state: dict[str, Tensor]):
        with torch.no_grad():
            for (n, _), o in zip(self.params, self.old):
                o.copy_(state[f"old/{n}"])


class RLRounds(DiffusionRounds):
    """The round source of group RL (see the module docstring)."""

    def __init__(self, recipe, cfg):
        super().__init__(recipe, cfg)
        self.kind = recipe.loss_fn.kind
        self._sampler = None

    def sampler(self, pipe) -> StepSampler:
        if self._sampler is None:
            o = self.o
            self._sampler = StepSampler(self.recipe.family, self.recipe.comp, o.sample_steps, o.guidance,
                                        self.resolution, pipe.vae_scale_factor, o.noise_level, o.eta)
        return self._sampler

    def window(self, r: int, chunk: int) -> list[int]:
        """GRPO's stochastic steps for one sampling call: every step but the last (``sde_window`` 0, Flow-GRPO) or
        ``sde_window`` consecutive steps starting at a draw keyed by (seed, round, chunk) in ``sde_range``
        (Flow-GRPO-Fast); none for NFT / AWM."""
        if self.kind != "policy_ratio":
            return []
        o, n = self.o, self.o.sample_steps
        last = n - 1 if self.recipe.family.flow else n  # the last flow step's noise is ~0: never trained
        if not o.sde_window:
            return list(range(last))
        lo, hi = o.sde_range if o.sde_range else (0, last)
        hi = min(hi, last)
        g = torch.Generator().manual_seed(rollout_seed(self.cfg.train.seed, r, chunk, 7))
        start = lo + int(torch.randint(0, max(1, hi - o.sde_window - lo + 1), (1,), generator=g))
        return list(range(start, min(start + o.sde_window, hi)))

    def make_round(self, r: int, step: int, path: Path) -> None:
        o, acc, rec = self.o, self.acc, self.recipe
        t0 = time.time()
        rec.before_round(step)
        pipe = self._pipe()
        sampler = self.sampler(pipe)
        idx = self.round_prompts(r)
        parts = []
        ctx = rec.old.swapped() if (self.kind == "flow_mix" and rec.old is not None) else contextlib.nullcontext()
        with ctx:  # NFT samples with its old policy; GRPO and AWM with the current one
            for c, lo in list(enumerate(range(0, len(idx), o.prompts_per_batch)))[acc.process_index::acc.num_processes]:
                chunk = idx[lo: lo + o.prompts_per_batch]
                ps = [self.prompts[i] for i in chunk for _ in range(o.samples)]
                seeds = [rollout_seed(self.cfg.train.seed, r, i, k) for i in chunk for k in range(o.samples)]
                roll = sampler.sample(rec.unet, pipe, ps, seeds, self.window(r, c), acc.device)
                part = {"chunk": c, "final": roll.final, "scores": self.reward.scores(self.decode(roll.final, pipe), ps)}
                if roll.window:
                    part.update(x=roll.x, x_next=roll.x_next, logp=roll.logp,
                                steps=torch.tensor(roll.window).expand(len(ps), -1).clone())
                parts.append(part)
        if acc.num_processes > 1:
            from accelerate.utils import gather_object  # torch.distributed: only in multi-process runs

            parts = gather_object(parts)
        if not acc.is_main_process:
            return
        parts.sort(key=lambda x: x["chunk"])
        k = o.samples
        scores = {lab: np.concatenate([p["scores"][lab] for p in parts]) for lab in self.reward.labels}
        groups = [list(range(i * k, (i + 1) * k)) for i in range(len(idx))]
        reward = self.reward.combine(scores, groups if o.normalize == "group" and len(scores) > 1 else None)
        gid = torch.arange(len(idx)).repeat_interleave(k)
        adv = group_advantages(torch.tensor(reward), gid, o.global_std)
        tensors = {"latents": torch.cat([p["final"] for p in parts]).contiguous(), "advantages": adv.float()}
        if "x" in parts[0]:
            tensors.update({key: torch.cat([p[src] for p in parts]).contiguous() for key, src in
                            (("x", "x"), ("x_next", "x_next"), ("old_logp", "logp"), ("steps", "steps"))})
        zero = float(np.mean([np.std(reward[g]) == 0 for g in groups]))
        raw = self.reward.combine(scores)
        stats = {"step": step, "round": r, "samples": len(reward), "rows": len(reward), "prompts": len(idx),
                 "mean_reward": float(raw.mean()), **{f"mean/{lab}": float(v.mean()) for lab, v in scores.items()},
                 "zero_std_groups": zero, "sample_seconds": round(time.time() - t0, 2)}
        prompts = [self.prompts[i] for i in idx for _ in range(k)]
        with atomic_folder(path) as tmp:  # a kill while writing leaves no round that looks finished
            save_file(tensors, str(tmp / "samples.safetensors"))
            (tmp / "rows.json").write_text(json.dumps({"prompts": prompts, "scores": {a: v.tolist() for a, v in
                                                                                      scores.items()}}))
            (tmp / "stats.json").write_text(json.dumps(stats))

    def load_round(self, path: Path):
        stats = json.loads((path / "stats.json").read_text())
        rows = json.loads((path / "rows.json").read_text())
        self.images_sampled = max(self.images_sampled, (stats["round"] + 1) * stats["samples"])
        return SampleRows(load_file(str(path / "samples.safetensors")), rows["prompts"],
                          f" (round {stats['round']})"), stats
