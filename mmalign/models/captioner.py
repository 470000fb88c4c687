"""Image captioners behind one interface: ``caption(images) -> list[str]``.

``BlipCaptioner`` wraps transformers' ``BlipForConditionalGeneration`` (loaded from a hub id or a
local folder with its processor). Used by DCPO's captioning strategy and ``mmalign caption``.
"""
from __future__ import annotations

import torch

from mmalign.paths import resolve


class BlipCaptioner:
    def __init__(self, model, processor, max_new_tokens: int = 30, prompt: str | None = None):
        self.model, self.processor = model.eval(), processor
        self.max_new_tokens, self.prompt = max_new_tokens, prompt

    @classmethod
    def load(cls, name_or_path: str, **kw):
        from transformers import AutoProcessor, BlipForConditionalGeneration

        path = resolve(name_or_path)
        return cls(BlipForConditionalGeneration.from_pretrained(path), AutoProcessor.from_pretrained(path), **kw)

    @torch.no_grad()
    def caption(self, images, batch_size: int = 16) -> list[str]:
        out = []
        for lo in range(0, len(images), batch_size):
            chunk = [im.convert("RGB") for im in images[lo: lo + batch_size]]
            kw = {"text": [self.prompt] * len(chunk)} if self.prompt else {}
            enc = self.processor(images=chunk, return_tensors="pt", **kw).to(self.model.device)
            ids = self.model.generate(**enc, max_new_tokens=self.max_new_tokens)
            out += [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
        return out


def load_captioner(name_or_path: str):
    """A captioner from a hub id / folder (BLIP family)."""
    return BlipCaptioner.load(name_or_path)
