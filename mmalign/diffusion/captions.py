"""DCPO caption tools (Saeedi et al. 2025, "Dual Caption Preference Optimization", arXiv 2502.06023).

DCPO gives each image of a pair its own caption. The preferred image keeps the prompt; the rejected
image's caption comes from one of three strategies:

* ``captioning``: a captioner describes the rejected image (the paper: LLaVA / Emu2; here any
  ``Captioner`` -- BLIP via transformers, or the shapes world's oracle describer);
* ``perturbation``: the prompt is perturbed at a level (weak / medium / strong). Rule-based here:
  1 / 2 / 3 same-category word substitutions from a small lexicon (colours, counts, sizes, animals,
  positions, ...), falling back to word drops / swaps; ``lm_perturb`` uses a causal LM instead (the
  paper uses the DIPPER paraphraser with lexical diversity 40 / 60 / 80);
* ``hybrid``: the captioner's caption of the rejected image, then perturbed.
"""
from __future__ import annotations

import random
import re

from mmalign.data.images import open_image
from mmalign.worlds import get_world

LEVELS = {"weak": 1, "medium": 2, "strong": 3}
LEXICON = {
    "color": ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "brown", "gray"],
    "shape": ["circle", "square", "triangle", "star", "heart", "hexagon"],
    "number": ["one", "two", "three", "four", "five", "six"],
    "size": ["small", "large", "tiny", "huge", "big"],
    "animal": ["cat", "dog", "horse", "bird", "fish", "cow", "sheep", "lion", "tiger", "rabbit"],
    "position": ["left", "right", "top", "bottom", "above", "below", "behind", "under"],
    "material": ["wooden", "metal", "glass", "plastic", "stone", "paper"],
    "time": ["day", "night", "morning", "evening", "sunset", "sunrise"],
    "season": ["spring", "summer", "autumn", "winter"],
    "weather": ["sunny", "rainy", "snowy", "cloudy", "foggy"],
}
WORD_CATEGORY = {w: c for c, ws in LEXICON.items() for w in ws}
STOP = {"a", "an", "the", "of", "on", "in", "with", "and", "at", "to", "is", "are", "by", "for"}


def perturb_caption(text: str, level: str = "medium", rng: random.Random | None = None) -> str:
    """Change the meaning of ``text`` by ``LEVELS[level]`` edits, preferring same-category substitutions
    (so the caption stays fluent but no longer matches the image)."""
    if level not in LEVELS:
        raise ValueError(f"unknown perturbation level {level!r}; choose {list(LEVELS)}")
    rng = rng or random.Random(0)
    tokens = re.findall(r"\w+|[^\w\s]+|\s+", text)
    n = LEVELS[level]
    slots = [i for i, t in enumerate(tokens) if t.lower() in WORD_CATEGORY]
    rng.shuffle(slots)
    edits = 0
    for i in slots[:n]:
        word = tokens[i]
        choices = [w for w in LEXICON[WORD_CATEGORY[word.lower()]] if w != word.lower()]
        new = rng.choice(choices)
        tokens[i] = new.capitalize() if word[0].isupper() else new
        edits += 1
    content = [i for i, t in enumerate(tokens) if t.strip() and t.isalnum() and t.lower() not in STOP]
    while edits < n and len(content) >= 2:  # no more lexicon words: swap two content words, then drop one
        if edits % 2 == 0:
            a, b = rng.sample(content, 2)
            tokens[a], tokens[b] = tokens[b], tokens[a]
        else:
            tokens[content.pop(rng.randrange(len(content)))] = ""
        edits += 1
    out = re.sub(r"\s+", " ", "".join(tokens)).strip()
    if out == text.strip():  # never return the prompt unchanged
        out = (text.strip() + " (altered)") if not content else out
    return out


def lm_perturb(model, tokenizer, texts: list[str], level: str = "medium", max_new_tokens: int = 24,
               seed: int = 0) -> list[str]:
    """LM-based perturbation: sample a rewrite with temperature 0.7 / 1.0 / 1.3 for weak / medium / strong."""
    import torch

    temp = {"weak": 0.7, "medium": 1.0, "strong": 1.3}[level]
    torch.manual_seed(seed)
    out = []
    for t in texts:
        prompt = f"Rewrite the caption with a different detail.\nCaption: {t}\nRewrite:"
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        gen = model.generate(ids, do_sample=True, temperature=temp, max_new_tokens=max_new_tokens,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        text = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).split("\n")[0].strip()
        out.append(text or perturb_caption(t, level, random.Random(seed)))
    return out


def world_captioner(name: str):
    """A plug-in world's oracle describer as a captioner: ``fn(images) -> captions``."""

    w = get_world(name)
    return lambda images: [w.describe(im) for im in images]


def dcpo_captions(winner_captions: list[str], loser_images, strategy: str, level: str = "medium",
                  captioner=None, seed: int = 0) -> list[str]:
    """The rejected image's caption for each pair under a DCPO strategy."""
    rng = random.Random(seed)

    def perturb_away(text: str, prompt: str) -> str:  # a perturbed caption must not equal the prompt
        for _ in range(10):
            out = perturb_caption(text, level, rng)
            if out != prompt:
                return out
        return out

    if strategy == "perturbation":
        return [perturb_away(c, c) for c in winner_captions]
    if captioner is None:
        raise ValueError(f"DCPO strategy {strategy!r} needs a captioner")
    caps = captioner(loser_images)
    if strategy == "captioning":
        return caps
    if strategy == "hybrid":
        return [perturb_away(c, p) for c, p in zip(caps, winner_captions)]
    raise ValueError(f"unknown DCPO strategy {strategy!r}; choose captioning, perturbation or hybrid")


def add_dual_captions(table, strategy: str, level: str = "medium", captioner=None, seed: int = 0, open_fn=open_image):
    """Pick-a-Pic table -> the same rows (ties dropped) with ``caption_0`` / ``caption_1``: the preferred
    image keeps the prompt, the rejected one gets the strategy's caption."""

    rows = [i for i in range(len(table)) if float(table[i]["label_0"]) != 0.5]
    win0 = [float(table[i]["label_0"]) == 1.0 for i in rows]
    prompts = [table[i]["caption"] for i in rows]
    losers = [open_fn(table[i]["jpg_1" if w else "jpg_0"], where=f"row {i}") for i, w in zip(rows, win0)] \
        if strategy != "perturbation" else None
    new = dcpo_captions(prompts, losers, strategy, level, captioner, seed)
    out = table.select(rows)
    c0 = [p if w else n for p, n, w in zip(prompts, new, win0)]
    c1 = [n if w else p for p, n, w in zip(prompts, new, win0)]
    for col in ("caption_0", "caption_1"):
        if col in out.column_names:
            out = out.remove_columns(col)
    return out.add_column("caption_0", c0).add_column("caption_1", c1)
