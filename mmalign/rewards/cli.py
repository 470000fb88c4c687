"""``mmalign score`` and ``mmalign label``.

    mmalign score --reward NAME [--reward NAME2 ...] --images DIR_OR_GLOB [--prompts FILE | --prompt TEXT]
                  [--references DIR] --out scores.csv|.jsonl [--html report.html] [--model NAME=PATH]
    mmalign score --list
    mmalign label --reward NAME --data pairs.parquet --out labelled.parquet [--mode bradley-terry --seed 0]
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np

from mmalign.data.images import contained_path, list_images, open_image, read_images
from mmalign.data.records import DataError

log = logging.getLogger(__name__)


def add_parsers(sub):
    p = sub.add_parser("score", help="score images with bundled reward models")
    p.add_argument("--reward", action="append", default=[], help="reward name (repeatable); see --list")
    p.add_argument("--images", help="a folder of images or a glob pattern")
    p.add_argument("--prompts", help=".txt (one per line, sorted-file order), .jsonl/.csv (file, prompt), "
                                     "default: metadata.jsonl in the image folder if present")
    p.add_argument("--prompt", help="one prompt for every image")
    p.add_argument("--references", help="folder of reference images (clip_i, dino, lambda_harmonic)")
    p.add_argument("--out", help="scores.csv or scores.jsonl")
    p.add_argument("--html", help="write a sortable gallery report")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="let metadata name files outside the image folder (trusted data only)")
    p.add_argument("--model", action="append", default=[], help="NAME=HUB_ID_OR_PATH weights for a reward")
    p.add_argument("--reward-arg", action="append", default=[], help="NAME.key=value extra loader argument")
    p.add_argument("--tiny", action="store_true", help="random tiny weights (tests / smoke runs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--list", action="store_true", help="list rewards, their inputs and where weights come from")
    p.set_defaults(func=cmd_score)

    q = sub.add_parser("label", help="turn a reward into preference labels for Pick-a-Pic-style pairs")
    q.add_argument("--reward", required=True)
    q.add_argument("--data", required=True, help="parquet / folder with caption, jpg_0, jpg_1")
    q.add_argument("--out", required=True, help="output parquet")
    q.add_argument("--mode", choices=["deterministic", "bradley-terry"], default="deterministic")
    q.add_argument("--temperature", type=float, default=1.0, help="Bradley-Terry: p0 = sigmoid((r0 - r1) / T)")
    q.add_argument("--tie-eps", type=float, default=0.0, help="deterministic: |r0 - r1| <= eps is a tie (0.5)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--model", default=None)
    q.add_argument("--tiny", action="store_true")
    q.add_argument("--device", default=None)
    q.add_argument("--batch-size", type=int, default=32)
    q.set_defaults(func=cmd_label)


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


# ------------------------------------------------------------------ score


def cmd_score(args) -> int:
    from mmalign.rewards import load_reward, reward_table
    from mmalign.utils import print_table

    if args.list:
        print_table(["reward", "needs", "weights"], reward_table())
        return 0
    if not args.reward or not args.images or not args.out:
        raise SystemExit("error: --reward, --images and --out are required (or --list)")
    models = dict(m.split("=", 1) for m in args.model)
    extra: dict[str, dict] = {}
    for ra in args.reward_arg:
        key, val = ra.split("=", 1)
        name, k = key.split(".", 1)
        extra.setdefault(name, {})[k] = val
    files = list_images(args.images)
    root = Path(args.images) if Path(args.images).is_dir() else None
    files, images, bad = read_images(files)
    prompts = read_prompts(files, args.prompts, args.prompt, root, args.allow_outside_root)
    references = None
    if args.references:
        _, references, _ = read_images(list_images(args.references))
    from mmalign.rewards import REWARDS

    for name in args.reward:
        cls = REWARDS[name] if name in REWARDS else None
        if cls is None:
            raise SystemExit(f"error: unknown reward {name!r}; known: {', '.join(sorted(REWARDS))}")
        if cls.needs_prompts:
            if prompts is None:
                raise SystemExit(f"error: reward {name!r} needs prompts: pass --prompt TEXT or --prompts FILE "
                                 "(or put a metadata.jsonl with file_name/prompt next to the images)")
            if len(prompts) != len(files) and args.prompts and args.prompts.endswith(".txt"):
                raise SystemExit(f"error: {args.prompts} has {len(prompts)} prompts for {len(files)} readable images")
            missing = [f.name for f, p in zip(files, prompts) if p is None]
            if missing:
                raise SystemExit(f"error: no prompt for {len(missing)} image(s), e.g. {missing[:3]}")
        if cls.needs_references and not references:
            raise SystemExit(f"error: reward {name!r} needs --references DIR")
    from tqdm.auto import tqdm

    scores: dict[str, list[float]] = {}
    for name in args.reward:
        rw = load_reward(name, model=models.get(name), device=args.device, tiny=args.tiny, **extra.get(name, {}))
        if name == "retrieval":  # every image is a candidate for every text: one call over the whole set
            vals = rw.score(images, prompts, references, batch_size=args.batch_size).tolist()
        else:
            vals = []
            for lo in tqdm(range(0, len(images), args.batch_size), desc=f"scoring {name}", dynamic_ncols=True):
                pr = prompts[lo: lo + args.batch_size] if prompts is not None else None
                vals += rw.score(images[lo: lo + args.batch_size], pr, references, batch_size=args.batch_size).tolist()
        scores[name] = vals
    write_scores(args.out, files, prompts, scores)
    rows = [[n, len(v), f"{np.mean(v):.4f}", f"{np.std(v):.4f}", f"{np.min(v):.4f}", f"{np.max(v):.4f}"]
            for n, v in scores.items()]
    print_table(["reward", "n", "mean", "std", "min", "max"], rows)
    if bad:
        print(f"{len(bad)} unreadable image(s) skipped")
    print(f"scores -> {args.out}")
    if args.html:
        write_html(args.html, files, images, prompts, scores)
        print(f"report -> {args.html}")
    return 0


def write_scores(out: str, files, prompts, scores: dict[str, list[float]]):
    rows = []
    for i, f in enumerate(files):
        r = {"file": str(f), "prompt": prompts[i] if prompts else ""}
        r.update({n: v[i] for n, v in scores.items()})
        rows.append(r)
    write_rows(out, rows)


def write_rows(out: str, rows: list[dict]):
    """One dict per row to ``.jsonl`` or ``.csv`` (header from the first row's keys)."""
    if not out.endswith((".jsonl", ".csv")):
        raise SystemExit(f"error: --out must end in .csv or .jsonl, got {out}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if out.endswith(".jsonl"):
        with open(out, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    else:
        with open(out, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def _thumb(im, size=160) -> str:
    from PIL import Image

    t = im.copy()
    scale = size / max(t.size)
    t = t.resize((max(1, round(t.width * scale)), max(1, round(t.height * scale))), Image.NEAREST
                 if max(im.size) < size else Image.BICUBIC)
    buf = io.BytesIO()
    t.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_html(path: str, files, images, prompts, scores: dict[str, list[float]]):
    """A self-contained gallery: summary table, then thumbnails sorted by the first reward."""
    names = list(scores)
    order = sorted(range(len(files)), key=lambda i: -scores[names[0]][i])
    summary = "".join(f"<tr><td>{html.escape(n)}</td><td>{np.mean(v):.4f}</td><td>{np.std(v):.4f}</td>"
                      f"<td>{np.min(v):.4f}</td><td>{np.max(v):.4f}</td></tr>" for n, v in scores.items())
    cards = []
    for rank, i in enumerate(order, 1):
        sc = "".join(f"<div><b>{html.escape(n)}</b> {scores[n][i]:.4f}</div>" for n in names)
        pr = html.escape(prompts[i]) if prompts and prompts[i] else ""
        cards.append(f'<figure><img src="{_thumb(images[i])}" alt="{html.escape(files[i].name)}">'
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


# ------------------------------------------------------------------ label


def label_pairs(reward, table, mode: str = "deterministic", temperature: float = 1.0, tie_eps: float = 0.0,
                seed: int = 0, batch_size: int = 32):
    """Score jpg_0 and jpg_1 of every row with ``reward`` and return (label_0, reward_0, reward_1, unreadable rows).
    deterministic: 1 / 0 by the higher reward, 0.5 within ``tie_eps``; bradley-terry: label_0 ~
    Bernoulli(sigmoid((r0 - r1) / temperature)) with a seeded generator."""
    img0, img1, caps, ok = [], [], [], []
    for i in range(len(table)):
        row = table[i]
        try:
            a, b = open_image(row["jpg_0"]), open_image(row["jpg_1"])
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


def cmd_label(args) -> int:
    from mmalign.diffusion.data import load_pairs_table
    from mmalign.rewards import load_reward

    table, _ = load_pairs_table(args.data)
    missing = [c for c in ("jpg_0", "jpg_1") if c not in table.column_names]
    if missing:
        raise SystemExit(f"error: {args.data} lacks column(s) {missing}")
    rw = load_reward(args.reward, model=args.model, device=args.device, tiny=args.tiny)
    if rw.needs_prompts and "caption" not in table.column_names:
        raise SystemExit(f"error: reward {args.reward!r} needs a caption column")
    labels, r0, r1, bad = label_pairs(rw, table, args.mode, args.temperature, args.tie_eps, args.seed, args.batch_size)
    keep = [i for i in range(len(table)) if i not in set(bad)]
    out = table.select(keep)
    for col in ("label_0", "label_1", "reward_0", "reward_1"):
        if col in out.column_names:
            out = out.remove_columns(col)
    out = out.add_column("label_0", labels[keep].tolist()).add_column("label_1", (1 - labels[keep]).tolist())
    out = out.add_column("reward_0", r0[keep].tolist()).add_column("reward_1", r1[keep].tolist())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.to_parquet(args.out)
    lab = labels[keep]
    print(f"labelled {len(keep)} pairs with {args.reward} ({args.mode}): image 0 preferred {int((lab == 1).sum())}, "
          f"image 1 preferred {int((lab == 0).sum())}, ties {int((lab == 0.5).sum())}; {len(bad)} unreadable -> {args.out}")
    return 0
