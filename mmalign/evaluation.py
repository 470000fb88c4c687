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

from mmalign.data.records import DataError

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


def diversity_rows(images: dict[str, list], keys: list[tuple[str, int]], base: str, seed: int = 0) -> list[dict]:
    """Per-prompt sample diversity (``mmalign.rewards.signals.diversity`` of a prompt's images over its seeds) for
    every model: mean over prompts with its 95 % interval; for other models the share of prompts more diverse than
    base and ``fell``: True when its whole interval lies below the base's (collapsed diversity, a reward-hacking
    sign; two intervals that overlap are not evidence). Empty when no prompt has two seeds."""
    from mmalign.rewards.signals import diversity  # lazy: signals imports torch, which report-only users skip

    by_prompt: dict[str, list[int]] = {}
    for i, (prompt, _) in enumerate(keys):
        by_prompt.setdefault(prompt, []).append(i)
    groups = [ix for ix in by_prompt.values() if len(ix) >= 2]
    if not groups:
        return []
    per = {m: [diversity([ims[i] for i in ix]) for ix in groups] for m, ims in images.items()}
    rows = []
    for m in [base] + [m for m in per if m != base]:
        v = per[m]
        lo, hi = bootstrap_ci(v, seed=seed)
        row = {"reward": "diversity", "model": m, "n": len(v), "mean": float(np.mean(v)), "ci_low": lo, "ci_high": hi}
        if m != base:
            w = wins(v, per[base])
            wl, wh = bootstrap_ci(w, seed=seed + 1)
            row.update(win_rate=float(w.mean()), win_low=wl, win_high=wh, fell=bool(hi < rows[0]["ci_low"]))
        rows.append(row)  # rows[0] is the base's
    return rows


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
        out.append([r["reward"], r["model"], r["n"], mean, win])
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
<h1>{e(title)}</h1><p>{shown}; the same prompt and seed for every model.</p>
<table>{table}</table>{''.join(cards)}</body></html>"""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(doc)


def align_folders(folders: dict[str, str | Path]) -> tuple[list[tuple[str, int]], dict[str, dict]]:
    """Items (prompt, seed) present in every folder, and per folder {(prompt, seed): metadata row}; folders
    that were not sampled on the same prompts and seeds are a clear error (nothing would be paired)."""
    from mmalign.diffusion.sampling import read_metadata  # diffusers: loaded only when folders are compared

    by = {}
    for name, d in folders.items():
        rows = read_metadata(d)
        by[name] = {(r["prompt"], int(r["seed"])): r for r in rows}
    names = list(by)
    keys = set(by[names[0]])
    for n in names[1:]:
        if set(by[n]) != keys:
            only_a, only_b = sorted(keys - set(by[n]))[:3], sorted(set(by[n]) - keys)[:3]
            raise DataError(f"folders {names[0]!r} and {n!r} were not sampled on the same (prompt, seed) items: "
                            f"{len(keys - set(by[n]))} only in {names[0]} (e.g. {only_a}), "
                            f"{len(set(by[n]) - keys)} only in {n} (e.g. {only_b}); sample both with the same "
                            "--prompts and --seeds")
    order = sorted(keys, key=lambda k: (by[names[0]][k].get("prompt_index", 0), k[0], k[1]))
    return order, by


def _open(folder, name: str):
    from mmalign.data.images import open_image  # PIL: loaded only when folders are scored

    try:
        return open_image(name, root=Path(folder), where=f"{folder}/metadata.jsonl")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{Path(folder) / name}: unreadable image ({type(e).__name__}: {e})") from e


def fidelity_rows(folders: dict[str, str | Path], reference: str | Path, weights: str | None = None,
                  device=None) -> list[dict]:
    """FID and KID of every model's folder against ``reference`` (``mmalign.rewards.signals.fid_kid``, through
    torch-fidelity): set statistics, one row each, lower is closer."""
    from mmalign.rewards.signals import fid_kid  # lazy: torch-fidelity is only needed when asked for

    rows = []
    for m, folder in folders.items():
        r = fid_kid(folder, reference, weights, device)
        common = {"model": m, "n": r["images"], "reference_images": r["reference_images"]}
        rows += [{"reward": "fid", "mean": r["fid"], **common},
                 {"reward": "kid", "mean": r["kid"], "std": r["kid_std"], **common}]
    return rows


def evaluate_folders(folders: dict[str, str | Path], rewards: list[str], out: str | Path, base: str | None = None,
                     models: dict | None = None, extra: dict | None = None, tiny: bool = False, device=None,
                     batch_size: int = 16, seed: int = 0, gallery_items: int = 64,
                     reference_images: str | Path | None = None, inception_weights: str | None = None) -> dict:
    """Score every folder's images (paired by prompt and seed) with every reward, plus each model's per-prompt
    diversity (``diversity_rows``: flagged when it fell below the base's interval) and, given
    ``reference_images``, its FID / KID against them (``fidelity_rows``); write ``scores.csv`` (one row per item
    and model), ``summary.json`` / ``summary.csv`` and ``gallery.html`` under ``out``."""
    from mmalign.rewards.scoring import check_inputs, score_images, write_rows  # reward models: loaded when scored

    out = Path(out)
    names = list(folders)
    base = base or names[0]
    keys, by = align_folders(folders)
    images = {n: [_open(folders[n], by[n][k]["file_name"]) for k in keys] for n in names}
    prompts = [k[0] for k in keys]
    check_inputs(rewards, [Path(by[base][k]["file_name"]) for k in keys], prompts, None)
    scores = {n: score_images(rewards, images[n], prompts, None, models, extra, tiny, device, batch_size)
              for n in names}
    rows = summarize_scores(scores, base=base, seed=seed)
    rows += diversity_rows(images, keys, base, seed)
    if reference_images is not None:
        rows += fidelity_rows(folders, reference_images, inception_weights, device)
    write_rows(str(out / "scores.csv"), [{"model": n, "prompt": k[0], "seed": k[1], "file": by[n][k]["file_name"],
                                          **{r: scores[n][r][i] for r in rewards}}
                                         for n in names for i, k in enumerate(keys)])
    write_rows(str(out / "summary.csv"), rows)
    import json

    (out / "summary.json").write_text(json.dumps({"base": base, "models": names, "rewards": rewards,
                                                  "items": len(keys), "rows": rows}, indent=1))
    step = max(1, len(keys) // gallery_items)
    items = [{"prompt": k[0], "seed": k[1], "images": {n: images[n][i] for n in names},
              "scores": {n: {r: scores[n][r][i] for r in rewards} for n in names}}
             for i, k in list(enumerate(keys))[::step]]
    others = [n for n in names if n != base]
    write_gallery(out / "gallery.html", items, names, rows, title=f"mmalign eval: {', '.join(others)} vs {base}",
                  total=len(keys))
    return {"rows": rows, "scores": scores, "keys": keys, "base": base}
