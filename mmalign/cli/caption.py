"""``mmalign caption``: caption a folder of images with a ClipCap folder or a BLIP hub id / folder."""
from __future__ import annotations

from pathlib import Path

from mmalign.data.records import DataError

# Library imports are inside run(): building the parser (mmalign --help) must not load torch (~4 s).


def add_arguments(p):
    p.add_argument("--model", help="captioner.json folder (ClipCap) or BLIP id / folder, e.g. "
                                   "Salesforce/blip-image-captioning-base or assets/models/shapes-captioner")
    p.add_argument("--images", required=True, help="a folder of images or a glob pattern")
    p.add_argument("--out", help="captions.jsonl or .csv (file_name + caption column); default: print only")
    p.add_argument("--column", default="caption", help="name of the caption column (e.g. prompt, for mmalign score)")
    p.add_argument("--tiny", action="store_true", help="a random tiny ClipCap (smoke runs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None)


def run(args) -> int:
    import torch

    from mmalign.data.images import list_images, read_images
    from mmalign.models.captioner import caption_images, load_captioner, tiny_clipcap
    from mmalign.data.records import write_rows
    from mmalign.utils import print_table

    if not args.model and not args.tiny:
        raise DataError("pass --model (a captioner folder or BLIP id) or --tiny")
    if args.batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {args.batch_size}")
    files, images, bad = read_images(list_images(args.images))
    if not images:
        raise DataError(f"no readable images at {args.images!r}")
    cap = tiny_clipcap() if args.tiny else load_captioner(args.model)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    caps = caption_images(cap.to(dev).eval(), images, args.batch_size)
    root = Path(args.images) if Path(args.images).is_dir() else None
    names = [str(f.relative_to(root)) if root else str(f) for f in files]
    if args.out:
        write_rows(args.out, [{"file_name": n, args.column: c} for n, c in zip(names, caps)])
    print_table(["file", args.column], [[n, c] for n, c in list(zip(names, caps))[:10]])
    if len(caps) > 10:
        print(f"... {len(caps) - 10} more")
    print(f"{len(caps)} captions" + (f" -> {args.out}" if args.out else "") + (f"; {len(bad)} unreadable skipped" if bad else ""))
    return 0
