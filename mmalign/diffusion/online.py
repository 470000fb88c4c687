"""Online alignment of text-to-image models: the round source of the ``diffusion`` recipe (``online:``).

A round (``DiffusionRounds.make_round``): the round's prompts are cut into chunks of ``prompts_per_batch``;
chunk c is sampled by process c mod N, ``samples`` images per prompt in one pipeline call of the family's own
diffusers pipeline (classifier-free guidance; DDIM / Euler for UNets, the flow-matching Euler sampler for SD3 /
Flux), each image from a generator keyed by (seed, round, prompt, k) -- so a chunk is the same computation on
any number of processes and the round reproduces. The **final latents** are kept (training never re-encodes
through the VAE); images are decoded once, for the rewards. The main process gathers the chunks, groups each
prompt's K images, turns the trained reward (``rewards.spec``, each term z-scored within the group when
``online.normalize=group``) into pairs (best vs worst, or the i-th best vs the i-th worst) and writes the round
(``latents.safetensors``, ``rows.json``, ``stats.json``). ``LatentPairs`` serves the pairs to the recipe's
usual scorer and reference: the same pairwise loss as offline Diffusion-DPO, on fresh on-policy pairs.

After every round (``evaluate``) the main process samples the fixed evaluation prompts x seeds and scores the
trained reward, the ``panel`` and the hacking signals (saturation, brightness, per-prompt diversity, latent
norm), each with a bootstrap interval, split into training and held-out prompts.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmalign.data.prompts import load_prompts
from mmalign.data.records import load_table
from mmalign.eval.stats import bootstrap_ci
from mmalign.rewards.scoring import group_pairs
from mmalign.rewards.signals import brightness, diversity, saturation
from mmalign.rewards.spec import load_image_rewards
from mmalign.utils import atomic_folder

from .data import ImagePairBatch, PairLatents, make_grid
from .models import place_frozen

Tensor = torch.Tensor
EVAL_SEED = 900_000


def rollout_seed(seed: int, rnd: int, prompt: int, k: int) -> int:
    """The seed of image k of prompt ``prompt`` in round ``rnd``: independent of batching and process count."""
    return (seed * 1_000_003 + rnd * 7_919 + prompt * 104_729 + k * 15_485_863 + 982_451_653) % (2**63 - 1)


class LatentPairs(torch.utils.data.Dataset):
    """One round's pairs of sampled final latents, served as ``ImagePairBatch`` (``latents`` set, no pixels, no
    flips, zero posterior std: the latents are the samples themselves)."""

    def __init__(self, latents: Tensor, pairs: list, prompts: list[str], resolution: int, label: str = ""):
        self.latents, self.pairs, self.prompts, self.resolution, self.label = latents, pairs, prompts, resolution, label

    def __len__(self):
        return len(self.pairs)

    def describe(self) -> str:
        return f"{len(self)} online pairs{self.label}"

    def __getitem__(self, i):
        w, lo = int(self.pairs[i][0]), int(self.pairs[i][1])
        return {"index": int(i), "latents": torch.stack([self.latents[w], self.latents[lo]]), "caption": self.prompts[w]}

    def collate(self, items: list) -> ImagePairBatch:
        lat = torch.stack([x["latents"] for x in items])
        n, r = len(items), float(self.resolution)
        return ImagePairBatch(captions=[x["caption"] for x in items],
                              index=torch.tensor([x["index"] for x in items], dtype=torch.long),
                              original_size=torch.full((n, 2), r), crop_top_left=torch.zeros(n, 2),
                              latents=PairLatents(lat, lat, torch.zeros_like(lat), torch.zeros_like(lat)))


class DiffusionRounds:
    """The ``RoundSource`` of an online diffusion run (see the module docstring)."""

    def __init__(self, recipe, cfg):
        self.recipe, self.cfg, self.o, self.acc = recipe, cfg, cfg.online, recipe.acc
        o, d = self.o, cfg.data
        prompts = load_prompts(o.prompts) if o.prompts else list(dict.fromkeys(load_table(d.train, d.split)["caption"]))
        self.prompts = prompts[: o.max_prompts]
        self.eval_prompts = load_prompts(o.eval_prompts) if o.eval_prompts else list(self.prompts)
        train_set = set(self.prompts)
        self.held_out = [p not in train_set for p in self.eval_prompts]
        self.resolution = o.resolution or d.resolution
        dev = self.acc.device
        self.reward = load_image_rewards(o.reward, "online.reward", dev, o.reward_models, o.tiny_rewards)
        self.panel = load_image_rewards(o.panel, "online.panel", dev, o.reward_models, o.tiny_rewards) \
            if o.panel and self.acc.is_main_process else None
        self.images_sampled = 0

    # ------------------------------------------------------------------ sampling

    def _pipe(self):
        r = self.recipe
        place_frozen(r.comp.load_frozen(), self.acc.device, r.dtype)
        return r.comp.pipeline(r.unet, scheduler=self.o.scheduler)

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], pipe=None, steps: int | None = None) -> Tensor:
        """Final latents [N, C, h, w] (fp32, CPU) of one pipeline call, one image per (prompt, seed)."""
        pipe = pipe or self._pipe()
        unet, res = self.recipe.unet, self.resolution
        was = unet.training
        unet.eval()
        try:
            out = pipe(prompt=prompts, num_inference_steps=steps or self.o.sample_steps, guidance_scale=self.o.guidance,
                       height=res, width=res, generator=[torch.Generator().manual_seed(s) for s in seeds],
                       output_type="latent").images
        finally:
            unet.train(was)
        if self.recipe.family.kind == "flux":  # FluxPipeline returns packed latents for output_type="latent"
            out = pipe._unpack_latents(out, res, res, pipe.vae_scale_factor)
        return out.float().cpu()

    @torch.no_grad()
    def decode(self, latents: Tensor, pipe=None, batch: int = 16) -> list:
        """Latents in the model's space -> PIL images, as the family's pipeline decodes them."""
        pipe = pipe or self._pipe()
        vae = pipe.vae
        cfg = vae.config
        shift = getattr(cfg, "shift_factor", None) or 0.0
        out = []
        for lo in range(0, len(latents), batch):
            z = latents[lo: lo + batch].to(self.acc.device, vae.dtype) / cfg.scaling_factor + shift
            out += pipe.image_processor.postprocess(vae.decode(z).sample.float(), output_type="pil")
        return out

    def _chunks(self, n: int) -> list[list[int]]:
        b = self.o.prompts_per_batch
        return [list(range(lo, min(n, lo + b))) for lo in range(0, n, b)]

    # ------------------------------------------------------------------ rounds

    def round_prompts(self, r: int) -> list[int]:
        """Indices of the prompts sampled in round ``r``: all, or ``prompts_per_round`` of them drawn by (seed, round)."""
        n, m = len(self.prompts), self.o.prompts_per_round
        if m is None or m >= n:
            return list(range(n))
        g = torch.Generator().manual_seed(rollout_seed(self.cfg.train.seed, r, 0, 0) + 17)
        return sorted(torch.randperm(n, generator=g)[:m].tolist())

    def make_round(self, r: int, step: int, path: Path) -> None:
        o, acc = self.o, self.acc
        t0 = time.time()
        pipe = self._pipe()
        idx = self.round_prompts(r)
        parts = []
        for c, lo in list(enumerate(range(0, len(idx), o.prompts_per_batch)))[acc.process_index::acc.num_processes]:
            chunk = idx[lo: lo + o.prompts_per_batch]
            ps = [self.prompts[i] for i in chunk for _ in range(o.samples)]
            seeds = [rollout_seed(self.cfg.train.seed, r, i, k) for i in chunk for k in range(o.samples)]
            lat = self.sample(ps, seeds, pipe)
            parts.append({"chunk": c, "latents": lat, "scores": self.reward.scores(self.decode(lat, pipe), ps)})
        if acc.num_processes > 1:
            from accelerate.utils import gather_object  # torch.distributed: only in multi-process runs

            parts = gather_object(parts)
        if not acc.is_main_process:
            return
        parts.sort(key=lambda x: x["chunk"])
        latents = torch.cat([p["latents"] for p in parts])
        scores = {k: np.concatenate([p["scores"][k] for p in parts]) for k in self.reward.labels}
        k = o.samples
        groups = [list(range(i * k, (i + 1) * k)) for i in range(len(idx))]
        combined = self.reward.combine(scores, groups if o.normalize == "group" else None)
        pairs = [(g[w], g[lo], m) for g in groups for w, lo, m in group_pairs(combined[g], o.pairs, o.min_margin)]
        raw = self.reward.combine(scores)
        stats = {"step": step, "round": r, "samples": len(latents), "rows": len(pairs), "prompts": len(idx),
                 "mean_reward": float(raw.mean()), **{f"mean/{lab}": float(v.mean()) for lab, v in scores.items()},
                 "mean_margin": float(np.mean([m for *_, m in pairs])) if pairs else float("nan"),
                 "sample_seconds": round(time.time() - t0, 2)}
        rows = {"prompts": [self.prompts[i] for i in idx for _ in range(k)], "scores": {a: v.tolist() for a, v in
                                                                                       scores.items()},
                "combined": combined.tolist(), "pairs": [[int(w), int(lo), float(m)] for w, lo, m in pairs]}

        with atomic_folder(path) as tmp:  # a kill while writing leaves no round that looks finished
            save_file({"latents": latents.contiguous()}, str(tmp / "latents.safetensors"))
            (tmp / "rows.json").write_text(json.dumps(rows))
            (tmp / "stats.json").write_text(json.dumps(stats))

    def load_round(self, path: Path):
        stats = json.loads((path / "stats.json").read_text())
        rows = json.loads((path / "rows.json").read_text())
        latents = load_file(str(path / "latents.safetensors"))["latents"]
        self.images_sampled = max(self.images_sampled, (stats["round"] + 1) * stats["samples"])
        if not rows["pairs"]:
            return None, stats
        return LatentPairs(latents, rows["pairs"], rows["prompts"], self.resolution,
                           f" (round {stats['round']}, {stats['samples']} images)"), stats

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """Trained reward, panel and hacking signals on the fixed evaluation prompts x seeds (main process)."""
        o = self.o
        pipe = self._pipe()
        n_seeds = o.eval_seeds
        lat, images = [], []
        for chunk in self._chunks(len(self.eval_prompts)):
            ps = [self.eval_prompts[i] for i in chunk for _ in range(n_seeds)]
            z = self.sample(ps, [EVAL_SEED + j for _ in chunk for j in range(n_seeds)], pipe, o.eval_steps)
            lat.append(z)
            images += self.decode(z, pipe)
        lat = torch.cat(lat)
        prompts = [p for p in self.eval_prompts for _ in range(n_seeds)]
        held = np.repeat(np.array(self.held_out, dtype=bool), n_seeds)
        trained_terms = self.reward.scores(images, prompts)
        trained = self.reward.combine(trained_terms)
        panel_terms = self.panel.scores(images, prompts) if self.panel is not None else {}
        per_prompt = [images[i * n_seeds: (i + 1) * n_seeds] for i in range(len(self.eval_prompts))]
        div = np.array([diversity(ims) for ims in per_prompt]) if n_seeds > 1 else np.array([])
        signals = {"saturation": saturation(images), "brightness": brightness(images),
                   "latent_norm": (lat.flatten(1).norm(dim=1) / lat[0].numel() ** 0.5).numpy()}
        ci = lambda v: (float(np.mean(v)), *bootstrap_ci(v)) if len(v) else (float("nan"),) * 3  # noqa: E731
        panel = {k: ci(v) for k, v in panel_terms.items()}
        if len(div):
            panel["diversity"] = ci(div)
        metrics = {"online/reward": float(trained.mean()), "online/images_sampled": float(self.images_sampled)}
        for name, v in {**trained_terms, **panel_terms, **signals}.items():
            metrics[f"online/{name}"] = float(np.mean(v))
            if held.any() and not held.all():
                metrics[f"online/{name}/held_out"] = float(np.mean(v[held]))
                metrics[f"online/{name}/train_prompts"] = float(np.mean(v[~held]))
        if len(div):
            metrics["online/diversity"] = float(div.mean())
        self._grid(images, step, n_seeds)
        return {"trained": ci(trained), "panel": {**panel, **{k: ci(v) for k, v in signals.items()}},
                "guarded": list(panel), "metrics": metrics}

    def _grid(self, images: list, step: int, n_seeds: int, prompts: int = 6):
        cols = min(n_seeds, 4)
        show = [images[i * n_seeds + j] for i in range(min(prompts, len(self.eval_prompts))) for j in range(cols)]
        labels = [self.eval_prompts[i] for i in range(min(prompts, len(self.eval_prompts))) for _ in range(cols)]
        out = Path(self.cfg.train.output_dir) / "online" / f"eval-step-{step:08d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        make_grid([im.resize((max(64, im.width), max(64, im.height))) for im in show], cols=cols, labels=labels).save(out)
