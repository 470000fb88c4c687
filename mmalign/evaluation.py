"""Base-vs-tuned evaluation statistics and reports (library behind ``mmalign eval`` and the demo).

Images are compared in pairs: the same prompt and seed, base model vs a tuned model. For each reward:
mean score per model with a 95% percentile-bootstrap interval, and the win rate of the tuned model over
the base (ties count half) with a bootstrap interval over the paired items -- how the Diffusion-DPO
family of papers report PickScore / HPSv2 / ImageReward / aesthetic / CLIPScore results.
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

BOOTSTRAP = 2000


def bootstrap_ci(values, stat=np.mean, n: int = BOOTSTRAP, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat`` over ``values`` (seeded, so reports reproduce)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(v), size=(n, len(v)))
    stats = np.array([stat(v[i]) for i in idx]) if stat is not np.mean else v[idx].mean(axis=1)
    lo, hi = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def wins(tuned, base) -> np.ndarray:
    """Per item: 1 if tuned > base, 0.5 on a tie, 0 otherwise."""
    t, b = np.asarray(tuned, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if t.shape != b.shape:
        raise ValueError(f"paired scores differ in length: {t.shape} vs {b.shape}")
    return (t > b) + 0.5 * (t == b)


def summarize_scores(scores: dict[str, dict[str, list[float]]], base: str = "base", seed: int = 0) -> list[dict]:
    """``scores[model][reward]`` (paired item lists) -> one row per (reward, model): mean, 95% interval and,
    for models other than ``base``, the win rate vs base with its interval."""
    rows = []
    rewards = list(next(iter(scores.values())))
    for r in rewards:
        for m, by in scores.items():
            v = by[r]
            lo, hi = bootstrap_ci(v, seed=seed)
            row = {"reward": r, "model": m, "n": len(v), "mean": float(np.mean(v)), "ci_low": lo, "ci_high": hi}
            if m != base:
                w = wins(v, scores[base][r])
                wl, wh = bootstrap_ci(w, seed=seed + 1)
                row.update(win_rate=float(w.mean()), win_low=wl, win_high=wh)
            rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells for ``mmalign.utils.print_table``."""
    out = []
    for r in rows:
        win = (f"{r['win_rate']:.3f} [{r['win_low']:.3f}, {r['win_high']:.3f}]" if "win_rate" in r else "-")
        out.append([r["reward"], r["model"], r["n"], f"{r['mean']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]", win])
    return ["reward", "model", "n", "mean [95% CI]", "win rate vs base [95% CI]"], out


def _thumb(im, size: int = 192) -> str:
    from PIL import Image

    t = im.copy()
    scale = size / max(t.size)
    t = t.resize((max(1, round(t.width * scale)), max(1, round(t.height * scale))),
                 Image.NEAREST if max(im.size) < size else Image.BICUBIC)
    buf = io.BytesIO()
    t.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_gallery(path: str | Path, items: list[dict], models: list[str], rows: list[dict], title: str = "mmalign eval"):
    """A self-contained side-by-side HTML gallery. ``items``: {prompt, seed, images: {model: PIL},
    scores: {model: {reward: value}}}. Every prompt, name and label is HTML-escaped."""
    e = html.escape
    head, cells = format_rows(rows)
    table = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" + "".join(
        "<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in cells)
    cards = []
    for it in items:
        figs = []
        for m in models:
            sc = "".join(f"<div><b>{e(k)}</b> {v:.4f}</div>" for k, v in it["scores"].get(m, {}).items())
            figs.append(f'<figure><figcaption class="model">{e(m)}</figcaption>'
                        f'<img src="{_thumb(it["images"][m])}" alt="{e(m)}">{sc}</figure>')
        cards.append(f'<section><h3>{e(it["prompt"])} <span class="seed">seed {e(str(it["seed"]))}</span></h3>'
                     f'<div class="row">{"".join(figs)}</div></section>')
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;background:#fafafa}}
table{{border-collapse:collapse;margin-bottom:20px}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}
section{{background:#fff;border:1px solid #ddd;margin:10px 0;padding:8px 12px}}h3{{margin:4px 0 8px;font-size:15px}}
.seed{{color:#777;font-weight:normal}}.row{{display:flex;gap:12px;flex-wrap:wrap}}figure{{margin:0;font-size:12px}}
img{{width:192px;height:192px;object-fit:contain;image-rendering:pixelated;background:#eee;display:block}}
.model{{font-weight:bold;margin-bottom:2px}}</style></head><body>
<h1>{e(title)}</h1><p>{len(items)} prompt/seed pairs; the same prompt and seed for every model.</p>
<table>{table}</table>{''.join(cards)}</body></html>"""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(doc)
