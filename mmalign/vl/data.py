"""Vision preference pairs: TRL's columns (prompt, chosen, rejected) plus an ``image`` column (bytes, an
HF Image dict, a PIL image or a path relative to the data file). The prompt goes through the model's
processor, which expands the image tokens; only completions are ever truncated, so a pair can never
silently lose its image (a prompt longer than max_prompt_length is an error naming the row)."""
from __future__ import annotations

import torch

from mmalign.data.images import open_image
from mmalign.data.records import DataError, require_columns, table_root
from mmalign.data.text import PairBatch, TextPreferenceData, pad_sequences

from .models import encode_prompt, is_prefix_lm


class VisionPreferenceData(TextPreferenceData):
    def __init__(self, source: str, processor, max_length: int = 256, max_prompt_length: int = 128,
                 split: str = "train", columns: dict | None = None, max_examples: int | None = None,
                 image_column: str = "image", allow_outside_root: bool = False):
        super().__init__(source, "pairs", processor.tokenizer, max_length, max_prompt_length, split, columns,
                         max_examples)
        require_columns(self.ds, [image_column], source, "vision preference pairs")
        self.processor, self.image_column = processor, image_column
        self.prefix_lm = is_prefix_lm(processor)
        self.root = table_root(source)
        self.allow_outside_root = allow_outside_root

    def __getitem__(self, i):
        r = self.ds[int(i)]
        try:
            image = open_image(r[self.image_column], self.root, self.allow_outside_root, f"{self.source}: row {i}")
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"{self.source}: row {i}: unreadable image ({e})") from e
        p_ids, pix = encode_prompt(self.processor, r["prompt"], image)
        if len(p_ids) > self.max_prompt_length:
            raise DataError(f"{self.source}: row {i}: prompt with image tokens is {len(p_ids)} tokens, more than "
                            f"data.max_prompt_length={self.max_prompt_length} (image tokens are never truncated)")
        seqs = []
        for c in (r["chosen"], r["rejected"]):
            c_ids = (self.tok(c, add_special_tokens=False)["input_ids"] + [self.eos])[: self.max_length - len(p_ids)]
            seqs.append((p_ids + c_ids, [0] * len(p_ids) + [1] * len(c_ids)))
        out = {"index": int(i), "seqs": seqs, "pixel_values": pix}
        if self.has_margin:
            out["reward_margin"] = float(r["reward_margin"])
        return out

    def collate(self, items: list[dict]) -> PairBatch:
        seqs = pad_sequences([it["seqs"][0] for it in items] + [it["seqs"][1] for it in items], self.pad)
        pix = torch.stack([it["pixel_values"] for it in items])
        seqs.pixel_values = torch.cat([pix, pix])  # chosen rows, then rejected rows: same images
        if self.prefix_lm:  # the prompt (image + question) is the bidirectional prefix, as the model was trained
            seqs.token_type_ids = seqs.completion_mask.long()
        margin = torch.tensor([it["reward_margin"] for it in items]) if self.has_margin else None
        return PairBatch(seqs, torch.tensor([it["index"] for it in items]), margin)
