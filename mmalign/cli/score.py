"""``mmalign score``: score images with bundled reward models; a table, a .csv/.jsonl and an HTML gallery.

    mmalign score --reward NAME [--reward NAME2 ...] --images DIR_OR_GLOB [--prompts FILE | --prompt TEXT]
                  [--references DIR] --out scores.csv|.jsonl [--html report.html] [--model NAME=PATH]
    mmalign score --list
"""
from __future__ import annotations

from pathlib import Path

from mmalign.cli.checks import check_positive
from mmalign.data.records import DataError

# Library imports are inside run(): building the parser (mmalign --help) must not load torch (~4 s).


def add_arguments(p):
    p.add_argument("--reward", action="append", default=[], help="reward name (repeatable); see --list")
    p.add_argument("--images", help="a folder of images or a glob pattern")
    p.add_argument("--prompts", help=".txt (one per line, sorted-file order), .jsonl/.csv (file, prompt), "
                                     "default: metadata.jsonl in the image folder if present")
    p.add_argument("--prompt", help="one prompt for every image")
    p.add_argument("--references", help="folder of reference images (clip_i, dino, lambda_harmonic)")
    p.add_argument("--out", help="scores.csv or scores.jsonl")
    p.add_argument("--html", help="write a sortable gallery report")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="let metadata (or symlinks in the folder) name files outside the image folder (trusted data only)")
    p.add_argument("--model", action="append", default=[], help="NAME=HUB_ID_OR_PATH weights for a reward")
    p.add_argument("--reward-arg", action="append", default=[], help="NAME.key=value extra loader argument")
    p.add_argument("--tiny", action="store_true", help="random tiny weights (tests / smoke runs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)
    p.add_argument("--list", action="store_true", help="list rewards, their inputs and where weights come from")


def parse_models(specs: list[str]) -> dict[str, str]:
    bad = [m for m in specs if "=" not in m]
    if bad:
        raise DataError(f"--model takes NAME=HUB_ID_OR_PATH, got {bad[0]!r}")
    return dict(m.split("=", 1) for m in specs)


def parse_reward_args(specs: list[str]) -> dict[str, dict]:
    extra: dict[str, dict] = {}
    for ra in specs:
        key, val = ra.split("=", 1)
        name, k = key.split(".", 1)
        extra.setdefault(name, {})[k] = val
    return extra


def run(args) -> int:
    import numpy as np

    from mmalign.data.images import list_images, read_images
    from mmalign.rewards import reward_table
    from mmalign.eval.report import write_score_gallery
    from mmalign.rewards.scoring import check_inputs, read_prompts, score_images, write_scores
    from mmalign.utils import print_table

    if args.list:
        print_table(["reward", "needs", "weights"], reward_table())
        return 0
    if not args.reward or not args.images or not args.out:
        raise DataError("--reward, --images and --out are required (or --list)")
    check_positive(args, "batch_size")
    files, images, bad = read_images(list_images(args.images, args.allow_outside_root))
    root = Path(args.images) if Path(args.images).is_dir() else None
    prompts = read_prompts(files, args.prompts, args.prompt, root, args.allow_outside_root)
    references = read_images(list_images(args.references))[1] if args.references else None
    check_inputs(args.reward, files, prompts, references,
                 args.prompts if args.prompts and args.prompts.endswith(".txt") else None)
    scores = score_images(args.reward, images, prompts, references, parse_models(args.model),
                          parse_reward_args(args.reward_arg), args.tiny, args.device, args.batch_size)
    write_scores(args.out, files, prompts, scores)
    print_table(["reward", "n", "mean", "std", "min", "max"],
                [[n, len(v), f"{np.mean(v):.4f}", f"{np.std(v):.4f}", f"{np.min(v):.4f}", f"{np.max(v):.4f}"]
                 for n, v in scores.items()])
    if bad:
        print(f"{len(bad)} unreadable image(s) skipped")
    print(f"scores -> {args.out}")
    if args.html:
        write_score_gallery(args.html, files, images, prompts, scores)
        print(f"report -> {args.html}")
    return 0
