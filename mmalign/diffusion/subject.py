"""Subject-driven data for RPO (Miao et al. 2024, "Subject-driven Text-to-Image Generation via
Preference-based Reinforcement Learning", arXiv 2407.12164).

Input is a DreamBench-style folder: the subject's reference images (4-6 jpg/png) and ``prompts.txt``
(one prompt per line). RPO's preference data: the base model generates images for every prompt; each
(reference image, generated image) pair gets a Bernoulli label y ~ sigma(R(ref) - R(gen)) from the
lambda-harmonic reward at lambda = 0 (text alignment only, as the reference code labels). The pairs are
written in the Pick-a-Pic schema with ``label_0 = y`` and read with ``data.label_mode: soft``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmalign.data.images import IMAGE_EXT, read_images


def load_subject_folder(folder: str | Path):
    folder = Path(folder)
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXT)
    _, images, bad = read_images(files)
    if bad:
        raise ValueError(f"{folder}: unreadable subject image(s) {[str(f) for f, _ in bad]}")
    if not images:
        raise ValueError(f"{folder}: no subject images (jpg/png)")
    pf = folder / "prompts.txt"
    if not pf.exists():
        raise FileNotFoundError(f"{folder}: needs prompts.txt (one prompt per line)")
    prompts = [x.strip() for x in pf.read_text().splitlines() if x.strip()]
    if not prompts:
        raise ValueError(f"{pf}: no prompts")
    return images, prompts


@torch.no_grad()
def build_rpo_pairs(pipe, references, prompts: list[str], reward, per_prompt: int = 16, seed: int = 0,
                    steps: int = 30, guidance: float = 7.5, resolution: int = 512, batch: int = 16) -> list[dict]:
    """Rows (caption, jpg_0 = reference, jpg_1 = generated, label_0 = y, label_1 = 1 - y, reward_0/1)."""
    rng = np.random.default_rng(seed)
    rows = []
    for pi, prompt in enumerate(prompts):
        gens = []
        for lo in range(0, per_prompt, batch):
            n = min(batch, per_prompt - lo)
            g = [torch.Generator().manual_seed(seed * 100_003 + pi * 1000 + lo + j) for j in range(n)]
            gens += pipe([prompt] * n, num_inference_steps=steps, guidance_scale=guidance, height=resolution,
                         width=resolution, generator=g).images
        refs = [references[j % len(references)] for j in range(len(gens))]
        r_ref = reward.score(refs, [prompt] * len(refs), references).numpy()
        r_gen = reward.score(gens, [prompt] * len(gens), references).numpy()
        y = (rng.random(len(gens)) < 1 / (1 + np.exp(-(r_ref - r_gen)))).astype(float)
        for ref, gen, yy, a, b in zip(refs, gens, y, r_ref, r_gen):
            rows.append({"caption": prompt, "jpg_0": ref, "jpg_1": gen, "label_0": float(yy), "label_1": 1 - float(yy),
                         "reward_0": float(a), "reward_1": float(b)})
    return rows
