"""Build the shipped Pick-a-Pic-format toy pairs in assets/data/shapes_pairs/ (deterministic).

Columns are Pick-a-Pic v2's (caption, jpg_0, jpg_1 as PNG bytes, label_0, label_1, ranking_id); the
preferred image shows its caption, the other the wrong colour or shape; a few rows are ties.
users.parquet adds a user_id column (PPD); vqa_pairs*.parquet are VLM preference pairs.

    python scripts/make_shapes_pairs.py
"""
import argparse
from pathlib import Path

from mmalign.toyworld.world import synthetic_pairs
from mmalign.diffusion.data import write_pickapic_parquet


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="assets/data/shapes_pairs")
    args = ap.parse_args()
    out = Path(args.out)
    write_pickapic_parquet(out / "train.parquet", synthetic_pairs(96, seed=0, ties=4))
    write_pickapic_parquet(out / "validation.parquet", synthetic_pairs(32, seed=1))
    users = synthetic_pairs(32, seed=5)
    for i, r in enumerate(users):  # PPD: alternate two users
        r["user_id"] = f"user{i % 2}"
    write_pickapic_parquet(out / "users.parquet", users)
    write_vqa_pairs(out / "vqa_pairs.parquet", 48, seed=6)
    write_vqa_pairs(out / "vqa_pairs_test.parquet", 16, seed=7)
    print(f"wrote {out}/train.parquet (96 rows, 4 ties), validation.parquet (32 rows), users.parquet (32 rows), "
          "vqa_pairs(_test).parquet (VLM DPO: prompt, image, chosen, rejected)")


def write_vqa_pairs(path, n, seed):
    """Shapes-world VQA preference pairs: chosen answers the question, rejected names a wrong colour/shape."""
    import io
    import random

    import datasets

    from mmalign.toyworld.qa import QUESTIONS, answer
    from mmalign.toyworld.world import COLORS, SHAPES, make_dataset

    rng = random.Random(seed)
    rows = []
    for im, _, sc in make_dataset(n, seed=seed):
        kind = rng.choice(list(QUESTIONS))
        wrong = answer(sc, kind, color=rng.choice([c for c in COLORS if c != sc.color]),
                       shape=rng.choice([s for s in SHAPES if s != sc.shape]))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        rows.append({"prompt": QUESTIONS[kind], "image": buf.getvalue(), "chosen": answer(sc, kind), "rejected": wrong})
    datasets.Dataset.from_list(rows).to_parquet(str(path))


if __name__ == "__main__":
    main()
