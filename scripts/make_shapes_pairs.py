"""Build the shipped Pick-a-Pic-format toy pairs in assets/data/shapes_pairs/ (deterministic).

Columns are Pick-a-Pic v2's (caption, jpg_0, jpg_1 as PNG bytes, label_0, label_1, ranking_id); the
preferred image shows its caption, the other the wrong colour or shape; a few rows are ties.
users.parquet adds a user_id column (PPD).

    python scripts/make_shapes_pairs.py
"""
import argparse
from pathlib import Path

from mmalign.demo.world import synthetic_pairs
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
    print(f"wrote {out}/train.parquet (96 rows, 4 ties), validation.parquet (32 rows), users.parquet (32 rows)")


if __name__ == "__main__":
    main()
