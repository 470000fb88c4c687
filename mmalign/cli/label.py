"""``mmalign label``: turn a reward into preference labels for Pick-a-Pic-style pairs.

    mmalign label --reward NAME --data pairs.parquet --out labelled.parquet [--mode bradley-terry --seed 0]
"""
from __future__ import annotations

from pathlib import Path

from mmalign.cli.checks import check_positive
from mmalign.data.records import DataError

# Library imports are inside run(): building the parser (mmalign --help) must not load torch (~4 s).


def add_arguments(q):
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
    q.add_argument("--allow-outside-root", action="store_true",
                   help="let the table name image files outside its own folder (trusted data only)")


def run(args) -> int:
    from functools import partial

    from mmalign.data.images import open_image
    from mmalign.diffusion.data import load_pairs_table
    from mmalign.rewards import load_reward
    from mmalign.rewards.scoring import label_pairs

    check_positive(args, "batch_size")
    table, root = load_pairs_table(args.data, allow_outside_root=args.allow_outside_root)
    missing = [c for c in ("jpg_0", "jpg_1") if c not in table.column_names]
    if missing:
        raise DataError(f"{args.data} lacks column(s) {missing}")
    rw = load_reward(args.reward, model=args.model, device=args.device, tiny=args.tiny)
    if rw.needs_prompts and "caption" not in table.column_names:
        raise DataError(f"reward {args.reward!r} needs a caption column")
    labels, r0, r1, bad = label_pairs(rw, table, args.mode, args.temperature, args.tie_eps, args.seed, args.batch_size,
                                      partial(open_image, root=root, allow_outside_root=args.allow_outside_root))
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
