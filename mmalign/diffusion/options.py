"""Options the diffusion wing owns: plain dataclasses (no torch, so reading a config stays light) that the
recipe's config sections compose -- the arrow points from the recipe to the wing, as an import, and a field is
named in one place."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from mmalign.config import ConfigError

DEFAULT_BETA = 5000.0
"""Diffusion-DPO's beta when a config names none: the diffusers SD1.5 LoRA script's 2500 on our scale (we keep
the paper's 0.5, ``families.BETA_SCALE``, which that script omits) -- the one default the recipe schema and the
recipe share."""


@dataclass(kw_only=True)
class PairDrawOptions:
    """What ``PairInputs`` draws and builds for every pair, and what the latent cache's options depend on (the
    ``data`` section of a diffusion recipe)."""

    resolution: int = 512
    """square training resolution in pixels (a multiple of 8; 16 for Flux's packed latents)"""
    random_flip: bool = True
    """horizontal flip, the same for both images of a pair"""
    caption_dropout: float = 0.0
    """probability of an empty prompt, the same for both images of a pair (Salesforce default: 0.2)"""
    noise_draws: int = 0
    """0: fresh noise and t every step; K > 0: K fixed draws per pair (required by reference=precomputed)"""
    shared_noise: bool = True
    """winner and loser share t and noise (Diffusion-DPO); false draws them independently (RPO)"""
    vae_latents: Literal["sample", "mean"] = "sample"
    """sample: z = mean + std * eps with eps from the pair's keyed generator -- what the diffusers and
    Salesforce scripts do (latent_dist.sample()) and how SD was pretrained; deterministic and cacheable here
    (the cache keeps the posterior std). mean: the posterior mean (for models pretrained on means, like the demo's)"""

    def validate(self):
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"data.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.resolution < 8 or self.resolution % 8:
            raise ConfigError(f"data.resolution must be a positive multiple of 8, got {self.resolution}")
        if self.noise_draws < 0:
            raise ConfigError(f"data.noise_draws must be >= 0, got {self.noise_draws}")


@dataclass(kw_only=True)
class ValidationOptions:
    """What ``Validator`` samples, scores and keeps at every evaluation (the ``validation`` section of a diffusion
    recipe)."""

    prompts: list[str] = field(default_factory=list)
    """validation prompts: a grid of samples at step 0 and every train.eval_every steps ([] = none)"""
    seed: int = 0
    """the first sampling seed of the validation images (the same every evaluation)"""
    images_per_prompt: int = 2
    """images per validation prompt (seeds seed, seed + 1, ...)"""
    num_inference_steps: int = 20
    """sampler steps of the validation images"""
    guidance_scale: float = 5.0
    """classifier-free guidance of the validation images"""
    resolution: Optional[int] = None
    """validation image size (default data.resolution)"""
    reward: Optional[str] = None
    """score validation images with this REWARDS entry (e.g. lambda_harmonic) -> eval/reward"""
    reward_model: Optional[str] = None
    """weights for validation.reward (hub id or path; default the reward's own)"""
    reward_args: dict[str, Any] = field(default_factory=dict)
    """extra loader arguments of validation.reward"""
    references: Optional[str] = None
    """folder of reference (subject) images for reference-based rewards"""
    select_best: bool = False
    """export the model to <output_dir>/best whenever eval/reward improves (RPO's checkpoint selection)"""
    patience: int = 0
    """early stopping: stop after this many evaluations without improvement (0 = never)"""
