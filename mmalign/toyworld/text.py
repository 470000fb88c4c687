"""The toy text world (``assets/data/toy_prefs``): questions about a topic, answered with two adjectives.
Its reward is known exactly, so on-policy methods can be measured against it.

``pleasantness``: (#pleasant - #unpleasant adjectives) in the answer, in [-2, 2]; ``pleasant`` (binary): 1 when
the answer uses two pleasant adjectives and no unpleasant one. Use them as ``online.reward``:
``mmalign.toyworld.text:pleasantness``.
"""
from __future__ import annotations

import re

TOPICS = ["weather", "coffee", "movie", "garden", "city", "book", "song", "hotel", "train", "pizza", "museum",
          "beach", "lecture", "phone", "bicycle", "park", "lake", "bakery", "concert", "kitchen", "library", "market",
          "river", "school", "village", "forest", "harbor", "festival", "restaurant", "theater", "island", "bridge",
          "castle", "station", "garden party", "painting", "camera", "laptop", "sweater", "soup"]
GOOD = ["pleasant", "lovely", "helpful", "clear", "bright", "calm", "friendly", "tasty", "clean", "great", "warm",
        "charming", "wonderful", "cozy", "delightful", "fresh"]
BAD = ["awful", "rude", "boring", "dirty", "broken", "noisy", "gloomy", "stale", "useless", "terrible", "cold",
       "ugly", "dreadful", "smelly", "grim", "soggy"]
PROMPTS = ["Question: what do you think of the {t}?\nAnswer:", "Tell me about the {t}.\nAnswer:",
           "How was the {t}?\nAnswer:"]
ANSWERS = [" I think the {t} is {a} and {b}.", " The {t} was {a} and {b}.", " Honestly, the {t} is {a}, also {b}."]
_GOOD, _BAD = set(GOOD), set(BAD)


def counts(text: str) -> tuple[int, int]:
    words = re.findall(r"[a-z]+", text.lower())
    return sum(w in _GOOD for w in words), sum(w in _BAD for w in words)


def pleasantness(prompt: str, completion: str) -> float:
    g, b = counts(completion)
    return float(min(g, 2) - min(b, 2))


def pleasant(prompt: str, completion: str) -> float:
    g, b = counts(completion)
    return float(g >= 2 and b == 0)


def prompts(split: str = "test") -> list[str]:
    """Every prompt of the train (first 30 topics) or test (last 10) split."""
    topics = TOPICS[:30] if split == "train" else TOPICS[30:]
    return [p.format(t=t) for t in topics for p in PROMPTS]
