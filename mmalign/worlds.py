"""Synthetic worlds with programmatic oracles, as plug-ins: ``WORLDS`` (one registry) and ``get_world``.

A world renders images with known content and judges text and images against it; recipes and data
tools take one by name (``world: shapes`` in a config, ``--world shapes`` on the command line) and never
import it. Worlds are discovered through the ``mmalign.worlds`` entry-point group (the shipped shapes
world is ``mmalign.toyworld:ShapesWorld``; a package of yours can add its own). A world provides:

    sample(n, seed)               -> [(image, caption)]           training / evaluation renders
    qa_rows(n, seed)              -> [{prompt, image, answer, kind}]  VQA with reference answers (BDHS, VLM online)
    judge(image, kind, text)      -> float                       answer score (correct - hallucinated)
    evaluate_vlm(model, processor, n) -> dict                    QA accuracy / hallucination metrics
    caption_accuracy(images, captions) -> float                  captions that name the true content
    describe(image)               -> str                         an oracle caption (DCPO captioning)
    reward(images, prompts)       -> [float]                     how well each image shows its prompt
"""
from __future__ import annotations

from importlib.metadata import entry_points

from mmalign.registry import Registry

WORLDS: Registry = Registry("world")
GROUP = "mmalign.worlds"


def _discover():
    for ep in entry_points(group=GROUP):
        if ep.name not in WORLDS:
            WORLDS[ep.name] = ep.load()


def get_world(name: str):
    """The world registered as ``name`` (an instance), discovering installed plug-ins on first use."""
    if name not in WORLDS:
        _discover()
    if name not in WORLDS:
        raise KeyError(f"unknown world {name!r}; known: {sorted(WORLDS) or 'none installed'} (worlds are plug-ins "
                       f"of the {GROUP!r} entry-point group: reinstall mmalign with pip install -e .)")
    w = WORLDS[name]
    return w() if isinstance(w, type) else w
