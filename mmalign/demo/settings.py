"""The demo's settings (no heavy imports: ``mmalign demo --help`` reads the defaults from here)."""
from __future__ import annotations

from dataclasses import dataclass, field

from mmalign.paths import ASSETS

DEMO_MODEL = ASSETS / "models" / "shapes-sd"
HELD_OUT = ["a green triangle", "a purple circle", "an orange square", "a blue triangle"]


@dataclass
class DemoSettings:
    out: str = "runs/demo"
    model: str = str(DEMO_MODEL)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """training seeds: one tuned model each; the table reports mean, spread and the worst seed"""
    steps: int = 300
    candidates: int = 32
    """samples per training prompt to label"""
    min_margin: float = 0.25
    """keep pairs whose oracle scores differ by at least this"""
    eval_seeds: int = 16
    """images per prompt (fixed sampling seeds) in the base-vs-tuned comparison"""
    beta: float = 2500.0
    lr: float = 2e-5
    batch_size: int = 16
    lora_rank: int = 0
    """0 = full fine-tune of the UNet or transformer (frozen reference copy); > 0 = LoRA with the adapters-off reference"""
    loss: str = "dpo"
    guidance: float = 3.0
    sample_steps: int = 20
    seed: int = 0
    """the seed of one training run (set per run from ``seeds``); also orients the labelled pairs"""
    held_out: list[str] = field(default_factory=lambda: list(HELD_OUT))
