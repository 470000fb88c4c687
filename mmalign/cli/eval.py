"""``mmalign eval``: the comparison every Diffusion-DPO-family paper reports -- base vs tuned on the same
prompts and seeds, several rewards, mean with a 95% bootstrap interval and the win rate vs base.

    mmalign eval --base MODEL --tuned dpo=LORA_DIR [--tuned full=PIPELINE ...] --prompts SET --seeds 0 1 2 3 \\
                 --reward pickscore --reward hpsv2 --model hpsv2=HPS_v2.1_compressed.pt --out DIR
    mmalign eval --folder base=DIR --folder tuned=DIR --reward imagereward --out DIR   # already sampled

Writes DIR/samples/<model>/ (when sampling), scores.csv, summary.csv, summary.json and gallery.html.
"""
from __future__ import annotations

import sys

from pathlib import Path

from mmalign.cli.checks import check_positive, check_resolution
from mmalign.data.records import DataError

# Library imports are inside run(): building the parser (mmalign --help) must not load torch (~4 s).


def add_arguments(p):
    p.add_argument("--base", help="base pipeline folder / hub id (sampled into DIR/samples/base)")
    p.add_argument("--tuned", action="append", default=[],
                   help="NAME=PATH: a LoRA folder (applied to --base) or a full pipeline folder; repeatable")
    p.add_argument("--folder", action="append", default=[],
                   help="NAME=DIR of images already sampled (with metadata.jsonl); the first is the base")
    p.add_argument("--prompts", help="prompt file or set (when sampling)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--reward", action="append", default=[], help="REWARDS name (repeatable)")
    p.add_argument("--model", action="append", default=[], help="NAME=HUB_ID_OR_PATH weights for a reward")
    p.add_argument("--reward-arg", action="append", default=[], help="NAME.key=value extra loader argument")
    p.add_argument("--tiny", action="store_true", help="random tiny reward weights (smoke runs)")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--diversity", action="append", default=[], choices=["dino"],
                   help="also a semantic per-prompt diversity: dino = mean pairwise cosine distance of DINO "
                        "embeddings (weights: --model dino=..., or --tiny); the pixel-space row is always there")
    p.add_argument("--reference-images", help="a folder of reference images (real photos, a base set): adds each "
                   "model's FID and KID against it (torch-fidelity)")
    p.add_argument("--inception-weights", help="local torch-fidelity Inception weights (pt_inception-2015-12-05 "
                   "*.pth) for --reference-images; default: downloaded once")


def _named(specs: list[str], what: str) -> dict[str, str]:
    """NAME=PATH pairs; a name becomes a folder under --out, so it must be a plain name (letters, digits, . _ -)."""
    import re

    out = {}
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep:
            name, path = Path(s).name, s
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name in (".", ".."):
            raise DataError(f"{what} {s!r}: the name {name!r} must be a plain folder name (letters, digits, . _ -)")
        if name in out:
            raise DataError(f"{what}: the name {name!r} is used twice")
        out[name] = path
    return out


def run(args) -> int:
    import torch

    from mmalign.cli.score import parse_models, parse_reward_args
    from mmalign.data.prompts import load_prompts
    from mmalign.diffusion.sampling import LORA_FILE, load_pipeline
    from mmalign.eval.sampling import made_by, sample_to_folder
    from mmalign.eval.folders import SET_ROWS, dino_measure, evaluate_folders
    from mmalign.eval.report import format_rows
    from mmalign.utils import print_table

    if not args.reward:
        raise DataError("pass at least one --reward (see mmalign score --list)")
    for r in [r for r in args.reward if r in SET_ROWS]:  # the same measure as eval's own per-prompt row: shown once
        print(f"note: --reward {r} is eval's per-prompt {r} row (one value per prompt, averaged over its images): "
              "shown once, as that row", file=sys.stderr)
    if not [r for r in args.reward if r not in SET_ROWS]:
        raise DataError("pass at least one --reward besides diversity (see mmalign score --list)")
    check_positive(args, "steps", "batch_size")
    check_resolution(args.resolution)
    if args.reference_images and not Path(args.reference_images).is_dir():
        raise DataError(f"--reference-images {args.reference_images} is not a folder")
    out = Path(args.out)
    if args.folder:
        if args.base or args.tuned:
            raise DataError("use either --folder (already sampled) or --base/--tuned (sample here), not both")
        folders = _named(args.folder, "--folder")
        if len(folders) < 2:
            raise DataError("--folder needs at least two folders: the base first, then the tuned model(s)")
    else:
        if not args.base or not args.tuned or not args.prompts:
            raise DataError("pass --base, at least one --tuned NAME=PATH and --prompts (or --folder NAME=DIR ...)")
        prompts = load_prompts(args.prompts)[: args.max_prompts]
        dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        specs = {"base": (args.base, None), **{n: ((args.base, p) if (Path(p) / LORA_FILE).is_file() else (p, None))
                                              for n, p in _named(args.tuned, "--tuned").items()}}
        for n, (model, lora) in specs.items():  # load every model first: a LoRA that does not fit fails early
            if not Path(model).exists() and "/" not in model:
                raise DataError(f"--tuned {n}: {model} is neither a LoRA folder nor a pipeline")
        folders = {}
        for n, (model, lora) in specs.items():
            pipe, kind = load_pipeline(model, lora, device=dev)
            folders[n] = out / "samples" / n
            sample_to_folder(pipe, prompts, args.seeds, folders[n], args.steps, args.guidance, args.resolution,
                             args.batch_size, meta=made_by(model, lora, kind))
            del pipe
    models = parse_models(args.model)
    measures = {"diversity": None}  # None: the pixel-space measure
    if "dino" in args.diversity:
        measures["diversity_dino"] = dino_measure(models, args.device, args.tiny)
    res = evaluate_folders(folders, args.reward, out, base=next(iter(folders)), models=models,
                           extra=parse_reward_args(args.reward_arg), tiny=args.tiny, device=args.device,
                           reference_images=args.reference_images, inception_weights=args.inception_weights,
                           diversity=measures)
    print(f"\n{len(res['keys'])} prompt/seed items per model; 95% bootstrap intervals; ties count half")
    print_table(*format_rows(res["rows"]))
    for r in res["rows"]:
        if r.get("fell"):
            base = next(b for b in res["rows"] if b["reward"] == r["reward"] and b["model"] == res["base"])
            what = "diversity" + (f" ({r['reward'].removeprefix('diversity_')})" if r["reward"] != "diversity" else "")
            print(f"warning: {r['model']}: per-prompt {what} {r['mean']:.4f} [{r['ci_low']:.4f}, "
                  f"{r['ci_high']:.4f}] fell "
                  f"below {res['base']}'s 95% interval "
                  f"[{base['ci_low']:.4f}, {base['ci_high']:.4f}] -- collapsed samples, a sign of reward hacking")
    print(f"-> {out / 'summary.csv'}, {out / 'scores.csv'}, {out / 'gallery.html'}")
    return 0
