"""Visual question answering in the shapes world: questions, ground-truth answers, and a judge that
flags hallucinations (an answer naming a colour or shape the image does not show)."""
from __future__ import annotations

import re

from .world import COLORS, SHAPES, Scene, analyse, describe

QUESTIONS = {
    "color": "Question: What color is the shape?\nAnswer:",
    "shape": "Question: What shape is in the image?\nAnswer:",
    "describe": "Question: Describe the image.\nAnswer:",
}


def answer(scene: Scene, kind: str, color: str | None = None, shape: str | None = None) -> str:
    c, s = color or scene.color, shape or scene.shape
    if kind == "color":
        return f" The shape is {c}."
    if kind == "shape":
        return f" It is a {s}."
    return f" The image shows {describe(c, s)} on a dark background."


def mentioned(text: str) -> tuple[set, set]:
    words = set(re.findall(r"[a-z]+", text.lower()))
    return words & set(COLORS), words & set(SHAPES)


def judge(image, question_kind: str, text: str) -> dict:
    """correct: names the true attribute(s) asked for; hallucinated: names any colour/shape not in the image."""
    a = analyse(image)
    cols, shps = mentioned(text)
    wrong = bool(cols - {a["color"]}) or bool(shps - {a["shape"]})
    need_c = question_kind in ("color", "describe")
    need_s = question_kind in ("shape", "describe")
    correct = (not need_c or a["color"] in cols) and (not need_s or a["shape"] in shps) and not wrong
    return {"correct": float(correct), "hallucinated": float(wrong), "score": float(correct) - float(wrong)}
