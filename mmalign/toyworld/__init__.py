"""The shapes world: coloured shapes on a plain background, with oracles (a plug-in world, see
``mmalign.worlds``; registered as ``shapes`` through the ``mmalign.worlds`` entry point).

Generic recipes never import this package: they ask ``mmalign.worlds.get_world("shapes")``.
"""
from __future__ import annotations

from .qa import QUESTIONS, answer, evaluate_qa, judge
from .world import (
    analyse,
    describe,
    is_correct,
    make_dataset,
    oracle_score,
    parse_prompt,
)


class ShapesWorld:
    name = "shapes"

    def sample(self, n: int, seed: int = 0):
        return [(im, caption) for im, caption, _ in make_dataset(n, seed=seed)]

    def qa_rows(self, n: int, seed: int = 0) -> list[dict]:
        return [{"prompt": q, "image": im, "answer": answer(sc, kind), "kind": kind}
                for im, _, sc in make_dataset(n, seed=seed) for kind, q in QUESTIONS.items()]

    def judge(self, image, kind: str | None, text: str) -> float:
        return judge(image, kind or "describe", text)["score"]

    def evaluate_vlm(self, model, processor, n: int) -> dict:
        return evaluate_qa(model, processor, n)

    def caption_accuracy(self, images, captions) -> float:
        """Share of captions naming the measured colour and shape of their image."""
        ok = 0
        for im, c in zip(images, captions):
            try:
                col, shp = parse_prompt(c)
            except ValueError:
                continue
            a = analyse(im)
            ok += a["color"] == col and a["shape"] == shp
        return ok / max(1, len(captions))

    def describe(self, image) -> str:
        """The oracle's caption: the measured colour and shape ("a red circle"); "an image" if blank."""
        a = analyse(image)
        return describe(a["color"], a["shape"]) if a["color"] else "an empty dark image"

    def reward(self, images, prompts) -> list[float]:
        return [oracle_score(i, p) for i, p in zip(images, prompts)]

    def correct(self, images, prompts) -> list[bool]:
        return [is_correct(i, p) for i, p in zip(images, prompts)]
