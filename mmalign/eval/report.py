"""Reports: the table ``mmalign eval`` prints, one thumbnail encoder, and two self-contained HTML pages -- the
side-by-side gallery of ``mmalign eval`` and the ranked score gallery of ``mmalign score --html`` (every prompt,
name and label HTML-escaped)."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

def format_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells for ``mmalign.utils.print_table`` (FID / KID rows: a set statistic, no interval; KID with
    the std over its subsets)."""
    out = []
    for r in rows:
        win = (f"{r['win_rate']:.3f} [{r['win_low']:.3f}, {r['win_high']:.3f}]" if "win_rate" in r else "-")
        if "ci_low" in r:
            mean = f"{r['mean']:.4f} [{r['ci_low']:.4f}, {r['ci_high']:.4f}]"
        else:
            mean = f"{r['mean']:.4f}" + (f" +- {r['std']:.4f} (subsets)" if "std" in r else "") + \
                f" vs {r['reference_images']} reference images"
        if r.get("fell"):  # collapsed diversity: said in the table (and so in the gallery), not only in a warning
            mean += "  FELL below base"
        out.append([r["reward"], r["model"], r["n"], mean, win])
    return ["reward", "model", "n", "mean [95% CI]", "win rate vs base [95% CI]"], out


def thumbnail(im, size: int = 192) -> str:
    """A PNG data URI of ``im`` scaled to fit ``size`` (nearest-neighbour when enlarging: small images stay sharp)."""
    from PIL import Image

    t = im.copy()
    scale = size / max(t.size)
    t = t.resize((max(1, round(t.width * scale)), max(1, round(t.height * scale))),
                 Image.NEAREST if max(im.size) < size else Image.BICUBIC)
    buf = io.BytesIO()
    t.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_gallery(path: str | Path, items: list[dict], models: list[str], rows: list[dict], title: str = "mmalign eval",
                  total: int | None = None):
    """A self-contained side-by-side HTML gallery. ``items``: {prompt, seed, images: {model: PIL},
    scores: {model: {reward: value}}}; ``total``: how many items were scored (the gallery may show a subset).
    Every prompt, name and label is HTML-escaped."""
    e = html.escape
    shown = f"{len(items)} prompt/seed items" if not total or total == len(items) else \
        f"{len(items)} of the {total} scored prompt/seed items shown (evenly spaced)"
    head, cells = format_rows(rows)
    table = "<tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" + "".join(
        ('<tr class="fell">' if any("FELL" in str(c) for c in r) else "<tr>")
        + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in cells)
    cards = []
    for it in items:
        figs = []
        for m in models:
            sc = "".join(f"<div><b>{e(k)}</b> {v:.4f}</div>" for k, v in it["scores"].get(m, {}).items())
            figs.append(f'<figure><figcaption class="model">{e(m)}</figcaption>'
                        f'<img src="{thumbnail(it["images"][m])}" alt="{e(m)}">{sc}</figure>')
        cards.append(f'<section><h3>{e(it["prompt"])} <span class="seed">seed {e(str(it["seed"]))}</span></h3>'
                     f'<div class="row">{"".join(figs)}</div></section>')
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;background:#fafafa}}
table{{border-collapse:collapse;margin-bottom:20px}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:left}}
section{{background:#fff;border:1px solid #ddd;margin:10px 0;padding:8px 12px}}h3{{margin:4px 0 8px;font-size:15px}}
.seed{{color:#777;font-weight:normal}}.row{{display:flex;gap:12px;flex-wrap:wrap}}figure{{margin:0;font-size:12px}}
img{{width:192px;height:192px;object-fit:contain;image-rendering:pixelated;background:#eee;display:block}}
.model{{font-weight:bold;margin-bottom:2px}}tr.fell td{{background:#fde2e2;color:#8a1010}}</style></head><body>
<h1>{e(title)}</h1><p>{shown}; the same prompt and seed for every model.</p>
<table>{table}</table>{''.join(cards)}</body></html>"""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(doc)


def write_score_gallery(path: str, files, images, prompts, scores: dict[str, list[float]]):
    """A self-contained gallery: summary table, then thumbnails sorted by the first reward."""
    names = list(scores)
    order = sorted(range(len(files)), key=lambda i: -scores[names[0]][i])
    summary = "".join(f"<tr><td>{html.escape(n)}</td><td>{np.mean(v):.4f}</td><td>{np.std(v):.4f}</td>"
                      f"<td>{np.min(v):.4f}</td><td>{np.max(v):.4f}</td></tr>" for n, v in scores.items())
    cards = []
    for rank, i in enumerate(order, 1):
        sc = "".join(f"<div><b>{html.escape(n)}</b> {scores[n][i]:.4f}</div>" for n in names)
        pr = html.escape(prompts[i]) if prompts and prompts[i] else ""
        cards.append(f'<figure><img src="{thumbnail(images[i], 160)}" alt="{html.escape(files[i].name)}">'
                     f'<figcaption><div class="rank">#{rank} {html.escape(files[i].name)}</div>'
                     f'<div class="prompt">{pr}</div>{sc}</figcaption></figure>')
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>mmalign scores</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;background:#fafafa}}
table{{border-collapse:collapse;margin-bottom:20px}}td,th{{border:1px solid #ccc;padding:4px 10px}}
.grid{{display:flex;flex-wrap:wrap;gap:12px}}figure{{margin:0;background:#fff;border:1px solid #ddd;padding:8px;width:180px}}
img{{width:160px;height:160px;object-fit:contain;image-rendering:pixelated;background:#eee}}
figcaption{{font-size:12px}}.rank{{color:#555}}.prompt{{font-style:italic;margin:2px 0}}</style></head><body>
<h1>Reward scores</h1><p>{len(files)} images, sorted by <b>{html.escape(names[0])}</b> (highest first).</p>
<table><tr><th>reward</th><th>mean</th><th>std</th><th>min</th><th>max</th></tr>{summary}</table>
<div class="grid">{''.join(cards)}</div></body></html>"""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(doc)
