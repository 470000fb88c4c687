"""Scoring images with bundled rewards, and the tables and reports around it (library functions behind
``mmalign score``, ``mmalign label`` and ``mmalign eval``).

    score_images(names, images, prompts, references, ...) -> {reward: [score per image]}
    read_prompts(files, prompts_file, prompt, root)        prompts for a folder (metadata.jsonl by default)
    write_scores                                           the .csv / .jsonl table of scores
    label_pairs                                            reward -> preference labels for a table's image pairs
    group_pairs                                            one prompt's scored samples -> (winner, loser) pairs
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mmalign.data.images import contained_path, open_image
from mmalign.data.records import DataError, write_rows

from .models import REWARDS, load_reward


# ------------------------------------------------------------------ inputs


def read_prompts(files: list[Path], prompts_file: str | None, prompt: str | None, root: Path | None,
                 allow_outside_root: bool = False):
    """Prompt per image: one for all, a .txt aligned with the sorted files, or .jsonl/.csv rows naming a
    file (file / file_name / image) and a prompt (prompt / text / caption) -- by default the image folder's
    ``metadata.jsonl`` (what ``mmalign sample`` writes). File names are relative to the image folder and
    must stay inside it (``--allow-outside-root`` to lift that for trusted data)."""
    if prompt is not None:
        return [prompt] * len(files)
    src = Path(prompts_file) if prompts_file else (root / "metadata.jsonl" if root else None)
    if src is None or not src.exists():
        if prompts_file:
            raise DataError(f"prompts file not found: {prompts_file}")
        return None
    if src.suffix == ".txt":
        lines = [x.rstrip("\n") for x in open(src) if x.strip()]
        return lines  # aligned with the sorted file list; length is checked by the caller
    if src.suffix == ".jsonl":
        rows = [json.loads(x) for x in open(src) if x.strip()]
    elif src.suffix == ".csv":
        rows = list(csv.DictReader(open(src)))
    else:
        raise DataError(f"unsupported prompts file {src} (use .txt, .jsonl or .csv)")
    by_path, by_name = {}, {}
    for i, r in enumerate(rows):
        key = r.get("file") or r.get("file_name") or r.get("image")
        text = r.get("prompt") or r.get("text") or r.get("caption")
        if key is None or text is None:
            raise DataError(f"{src}: row {i}: rows need a file (file/file_name/image) and a prompt (prompt/text/caption)")
        if root is not None:
            by_path[contained_path(root, key, f"{src}: row {i}", allow_outside_root).resolve()] = text
        by_name[Path(key).name] = text
    return [by_path.get(f.resolve(), by_name.get(f.name)) if root is not None else by_name.get(f.name) for f in files]


def check_inputs(names: list[str], files, prompts, references, prompts_txt: str | None = None):
    """Clear errors before any model loads: unknown rewards, missing prompts or references."""
    for name in names:
        if name not in REWARDS:
            raise DataError(f"unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
        cls = REWARDS[name]
        if cls.needs_prompts:
            if prompts is None:
                raise DataError(f"reward {name!r} needs prompts: pass --prompt TEXT or --prompts FILE "
                                "(or put a metadata.jsonl with file_name/prompt next to the images)")
            if prompts_txt and len(prompts) != len(files):
                raise DataError(f"{prompts_txt} has {len(prompts)} prompts for {len(files)} readable images")
            missing = [f.name for f, p in zip(files, prompts) if p is None]
            if missing:
                raise DataError(f"no prompt for {len(missing)} image(s), e.g. {missing[:3]}")
        if cls.needs_references and not references:
            raise DataError(f"reward {name!r} needs --references DIR")


def score_images(names: list[str], images, prompts, references=None, models: dict | None = None,
                 extra: dict | None = None, tiny: bool = False, device=None, batch_size: int = 32,
                 progress: bool = True) -> dict[str, list[float]]:
    """{reward name: one score per image}; each reward is loaded once and run in batches."""
    scores = {}
    for name in names:
        rw = load_reward(name, model=(models or {}).get(name), device=device, tiny=tiny, **(extra or {}).get(name, {}))
        if name == "retrieval":  # every image is a candidate for every text: one call over the whole set
            scores[name] = rw.score(images, prompts, references, batch_size=batch_size).tolist()
            continue
        vals = []
        for lo in tqdm(range(0, len(images), batch_size), desc=f"scoring {name}", dynamic_ncols=True,
                       disable=not progress):
            pr = prompts[lo: lo + batch_size] if prompts is not None else None
            vals += rw.score(images[lo: lo + batch_size], pr, references, batch_size=batch_size).tolist()
        scores[name] = vals
    return scores


def write_scores(out: str, files, prompts, scores: dict[str, list[float]]):
    rows = []
    for i, f in enumerate(files):
        r = {"file": str(f), "prompt": prompts[i] if prompts else ""}
        r.update({n: v[i] for n, v in scores.items()})
        rows.append(r)
    write_rows(out, rows)


# ------------------------------------------------------------------ label


def label_pairs(reward, table, mode: str = "deterministic", temperature: float = 1.0, tie_eps: float = 0.0,
                seed: int = 0, batch_size: int = 32, open_fn=open_image):
    """Score jpg_0 and jpg_1 of every row with ``reward`` and return (label_0, reward_0, reward_1, unreadable rows).
    deterministic: 1 / 0 by the higher reward, 0.5 within ``tie_eps``; bradley-terry: label_0 ~
    Bernoulli(sigmoid((r0 - r1) / temperature)) with a seeded generator. ``open_fn(value, where=...)`` opens a
    table's image value (``open_image`` bound to the table's folder)."""
    img0, img1, caps, ok = [], [], [], []
    for i in range(len(table)):
        row = table[i]
        try:
            a, b = (open_fn(row[k], where=f"row {i}: {k}") for k in ("jpg_0", "jpg_1"))
        except DataError:  # a path outside the data's folder: refused, not "unreadable"
            raise
        except Exception as e:
            print(f"warning: row {i}: unreadable image ({e}); left unlabelled", file=sys.stderr)
            continue
        img0.append(a)
        img1.append(b)
        caps.append(row.get("caption"))
        ok.append(i)
    prompts = caps if reward.needs_prompts else None
    r0 = reward.score(img0, prompts, batch_size=batch_size).numpy()
    r1 = reward.score(img1, prompts, batch_size=batch_size).numpy()
    if mode == "deterministic":
        lab = np.where(np.abs(r0 - r1) <= tie_eps, 0.5, (r0 > r1).astype(float))
    elif mode == "bradley-terry":
        p = 1.0 / (1.0 + np.exp(-(r0 - r1) / temperature))
        lab = (np.random.default_rng(seed).random(len(p)) < p).astype(float)
    else:
        raise ValueError(f"unknown labelling mode {mode!r}")
    labels = np.full(len(table), np.nan)
    rw0, rw1 = labels.copy(), labels.copy()
    labels[ok], rw0[ok], rw1[ok] = lab, r0, r1
    bad = sorted(set(range(len(table))) - set(ok))
    return labels, rw0, rw1, bad


def group_pairs(scores: np.ndarray, mode: str = "best_worst", min_margin: float = 0.0) -> list[tuple[int, int, float]]:
    """(winner, loser, margin) within one prompt's group of K scores: its best vs its worst, (``halves``) the i-th
    best vs the i-th worst for i < K/2, or (``all``) every pair. A pair needs margin > ``min_margin`` (and > 0:
    equal scores carry no preference); on equal scores the earlier sample is taken first (a stable order)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    if mode == "best_worst":
        cand = [(order[0], order[-1])]
    elif mode == "halves":
        cand = list(zip(order[: len(order) // 2], reversed(order[len(order) // 2:])))
    else:
        cand = [(order[i], order[j]) for i in range(len(order)) for j in range(i + 1, len(order))]
    out = []
    for w, lo in cand:
        m = float(scores[w] - scores[lo])
        if m > max(min_margin, 0.0):
            out.append((w, lo, m))
    return out
