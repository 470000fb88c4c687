"""Caption rewards: CLIP-S with the grammar-aware text encoder (Cho et al. 2022, "Fine-grained Image
Captioning with CLIP Reward", arXiv 2205.13115) and the discriminative retrieval reward (Dessi et al.
2023, arXiv 2304.01662).

Grammar: a head ``Linear(d, d, bias=False) - ReLU - Linear(d, 2, bias=False)`` on the CLIP text
feature predicts whether a caption is well-formed; it is trained (with the text encoder) on captions
corrupted by exactly one of repeat / remove / insert / swap / shuffle (``corrupt_caption``).
Deviation: the head reads the projected text embedding (the original reads the pooler output before
the projection), so it works with any CLIP backbone.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmalign.paths import resolve

Tensor = torch.Tensor
OPS = ("repeat", "remove", "insert", "swap", "shuffle")


class GrammarHead(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.ReLU(), nn.Linear(dim, 2, bias=False))

    def forward(self, text_features: Tensor) -> Tensor:
        return self.net(text_features)

    def prob(self, text_features: Tensor) -> Tensor:
        """P(grammatical) = softmax(head)[:, 1]."""
        return torch.softmax(self.forward(text_features).float(), -1)[:, 1]


def corrupt_caption(text: str, rng: random.Random, vocab: list[str]) -> tuple[str, str]:
    """Exactly one corruption (Cho et al., retrieval/text_utils.py): repeat an n-gram (n <= 3) 1-3 times,
    remove an n-gram, insert 1-3 random vocabulary words, swap 1-3 words for random ones, or shuffle all
    words. Returns (corrupted text, operation); the result always differs from the input."""
    words = text.split()
    for _ in range(20):
        op = rng.choice(OPS)
        w = list(words)
        if op == "repeat":
            n = rng.randint(1, min(3, len(w)))
            i = rng.randrange(len(w) - n + 1)
            gram = w[i: i + n]
            for _ in range(rng.randint(1, 3)):
                w[i + n: i + n] = gram
        elif op == "remove" and len(w) > 1:
            n = rng.randint(1, min(3, len(w) - 1))
            i = rng.randrange(len(w) - n + 1)
            del w[i: i + n]
        elif op == "insert":
            for _ in range(rng.randint(1, 3)):
                w.insert(rng.randrange(len(w) + 1), rng.choice(vocab))
        elif op == "swap":
            for _ in range(rng.randint(1, min(3, len(w)))):
                w[rng.randrange(len(w))] = rng.choice(vocab)
        elif op == "shuffle":
            rng.shuffle(w)
        out = " ".join(w)
        if out != text:
            return out, op
    return text + " " + rng.choice(vocab), "insert"


class CaptionReward:
    """``kind='clip_s'``: clip_weight * 2.5 max(cos(image, prefix + caption), 0) + grammar_weight * P(grammatical)
    (grammar needs ``grammar_head.safetensors`` next to the CLIP weights).
    ``kind='retrieval'``: log p(image_i | caption) among the images scored together (logit-scaled cosines)."""

    def __init__(self, backbone, kind: str = "clip_s", prefix: str = "A photo depicts ", clip_weight: float = 1.0,
                 grammar_weight: float = 0.0, grammar_head: GrammarHead | None = None):
        self.backbone, self.kind, self.prefix = backbone, kind, prefix
        self.clip_weight, self.grammar_weight, self.head = clip_weight, grammar_weight, grammar_head
        if grammar_weight and grammar_head is None:
            raise ValueError("reward.grammar_weight > 0 needs a grammar head (grammar_head.safetensors in reward.model)")

    @classmethod
    def from_config(cls, section, device=None):
        from mmalign.rewards.models import _load_clip, _tiny_open_clip

        backbone = _tiny_open_clip() if section.tiny else _load_clip(section.model or "openai/clip-vit-base-patch32")
        head = None
        if section.model and (Path(resolve(section.model)) / "grammar_head.safetensors").exists():
            from safetensors.torch import load_file

            sd = load_file(str(Path(resolve(section.model)) / "grammar_head.safetensors"))
            head = GrammarHead(sd["net.0.weight"].shape[1])
            head.load_state_dict(sd)
        elif section.tiny and section.grammar_weight:
            torch.manual_seed(0)
            head = GrammarHead(backbone.model.text_projection.shape[-1])
        dev = torch.device(device) if device else torch.device("cpu")
        backbone.to(dev)
        if head is not None:
            head.to(dev).eval()
        return cls(backbone, section.kind, section.prefix, section.clip_weight, section.grammar_weight, head)

    @torch.no_grad()
    def __call__(self, images, captions: list[str], per_image: int = 1) -> Tensor:
        """``captions``: ``per_image`` captions for each image, image-major. Returns [len(captions)]."""
        img = self.backbone.image_features(images)
        if self.kind == "retrieval":
            txt = self.backbone.text_features(captions)
            logits = self.backbone.logit_scale * txt @ img.T  # [B*K, B]
            target = torch.arange(len(images), device=img.device).repeat_interleave(per_image)
            return F.log_softmax(logits.float(), -1).gather(1, target[:, None])[:, 0].cpu()
        txt = self.backbone.text_features([self.prefix + c for c in captions])
        r = self.clip_weight * 2.5 * (img.repeat_interleave(per_image, 0) * txt).sum(-1).clamp(min=0)
        if self.grammar_weight:
            r = r + self.grammar_weight * self.head.prob(txt if not self.prefix else
                                                         self.backbone.text_features(captions))
        return r.float().cpu()
