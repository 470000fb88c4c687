"""Visual question answering in the shapes world: questions, ground-truth answers, and a judge that
flags hallucinations (an answer naming a colour or shape the image does not show)."""
from __future__ import annotations

import re

from mmalign.vl.models import generate

from .world import COLORS, SHAPES, Scene, analyse, describe, make_dataset

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


def evaluate_qa(model, processor, n_scenes: int = 100, seed: int = 54_321, max_new_tokens: int = 16,
                kinds=tuple(QUESTIONS)) -> dict:
    """Greedy answers to every question on ``n_scenes`` held-out renders, judged: accuracy and
    hallucination rate (share of answers naming a colour or shape the image does not show)."""


    data = make_dataset(n_scenes, seed=seed)
    was = model.training
    model.eval()
    rows = [(im, k) for im, _, _ in data for k in kinds]
    answers = generate(model, processor, [QUESTIONS[k] for _, k in rows], [im for im, _ in rows], max_new_tokens)
    model.train(was)
    js = [judge(im, k, a) for (im, k), a in zip(rows, answers)]
    out = {"qa_accuracy": sum(j["correct"] for j in js) / len(js),
           "hallucination_rate": sum(j["hallucinated"] for j in js) / len(js)}
    for k in kinds:
        sel = [j for (_, kk), j in zip(rows, js) if kk == k]
        out[f"hallucination_{k}"] = sum(j["hallucinated"] for j in sel) / len(sel)
    out["examples"] = answers[:len(kinds)]
    return out
