"""Train the grammar-aware CLIP text encoder (Cho et al. 2022, Sec. 3.3) and write it with its grammar head.

The text tower is fine-tuned together with a 2-layer grammar head on captions and their automatic
corruptions (repeat / remove / insert / swap / shuffle), keeping the contrastive image-text loss; the
output folder works as ``reward: {model: OUT, grammar_weight: ...}`` in a captioner config.

    python scripts/train_grammar_clip.py                         # toy CLIP on shapes-world captions, ~1 min
    python scripts/train_grammar_clip.py --clip openai/clip-vit-base-patch32 --pairs coco.parquet --out clip-grammar
"""
import argparse
from pathlib import Path

import torch

from mmalign.paths import ASSETS
from mmalign.rewards.caption import grammar_accuracy, save_grammar_clip, train_grammar
from mmalign.rewards.models import _load_clip


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", default=str(ASSETS / "models" / "toy-clip"))
    ap.add_argument("--pairs", help="parquet/JSONL with image + caption columns (default: rendered shapes world)")
    ap.add_argument("--shapes-world", type=int, default=4000)
    ap.add_argument("--out", default=str(ASSETS / "models" / "toy-clip-grammar"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    backbone = _load_clip(args.clip)
    if args.pairs:
        from mmalign.data.records import load_table
        from mmalign.data.images import open_image

        t = load_table(args.pairs)
        images, captions = [open_image(x) for x in t["image"]], [str(c) for c in t["caption"]]
    else:
        from mmalign.toyworld.world import describe, make_dataset

        data = make_dataset(args.shapes_world, seed=args.seed + 50)
        images, captions = [d[0] for d in data], [describe(d[2].color, d[2].shape) for d in data]
    n_test = max(1, len(captions) // 10)
    head = train_grammar(backbone, captions[n_test:], images[n_test:], steps=args.steps, lr=args.lr, seed=args.seed)
    acc = grammar_accuracy(backbone, head, captions[:n_test])
    save_grammar_clip(backbone, head, args.clip, args.out)
    (Path(args.out) / "TRAINING.md").write_text(
        f"Grammar-aware text encoder from {args.clip}, trained by scripts/train_grammar_clip.py {vars(args)}.\n\n"
        f"Held-out grammar accuracy (caption vs one corruption of it, {2 * n_test} texts): {acc:.3f}.\n")
    print(f"held-out grammar accuracy: {acc:.3f}; saved to {args.out}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
