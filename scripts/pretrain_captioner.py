"""Pretrain the demo captioner (assets/models/shapes-captioner): ClipCap over the shipped toy CLIP.

A frozen toy-CLIP image encoder, an MLP prefix mapper and a 2-layer GPT-2, trained by maximum
likelihood on shapes-world renders with *systematically* noisy captions: orange shapes are called
"red" and purple ones "blue" 60% of the time, green ones "yellow" 30% -- so the most likely (greedy)
caption is wrong for orange and purple, and reward fine-tuning has something to fix.

    python scripts/pretrain_captioner.py            # ~3 minutes on 2 CPU cores
"""
import argparse
import random
from pathlib import Path

import torch

from mmalign.toyworld.world import describe, make_dataset
from mmalign.models.captioner import tiny_clipcap
from mmalign.paths import ASSETS
from mmalign.rewards.backbones import OpenClip
from mmalign.worlds import get_world

CONFUSION = {"orange": ("red", 0.6), "purple": ("blue", 0.6), "green": ("yellow", 0.3)}


def noisy(scene, rng):
    c = scene.color
    if c in CONFUSION and rng.random() < CONFUSION[c][1]:
        c = CONFUSION[c][0]
    return describe(c, scene.shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ASSETS / "models" / "shapes-captioner"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    rng = random.Random(args.seed)
    clip_path = "assets/models/toy-clip"
    cap = tiny_clipcap(OpenClip.load(clip_path), seed=args.seed, n_layer=2, n_embd=64, prefix_len=4)
    cap.clip_path = clip_path
    data = make_dataset(20_000, seed=args.seed)
    with torch.no_grad():  # the CLIP encoder is frozen: embed the pool once
        feats = torch.cat([cap.clip.image_features([d[0] for d in data[lo: lo + 512]]) for lo in range(0, len(data), 512)])
    opt = torch.optim.AdamW([p for p in cap.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=args.steps, pct_start=0.1)
    cap.train()
    for step in range(args.steps):
        idx = [rng.randrange(len(data)) for _ in range(args.batch)]
        ids, mask = cap.tokenize([noisy(data[i][2], rng) for i in idx])
        ctx = cap.mapper(feats[idx]).view(len(idx), cap.prefix_len, -1)
        lp = cap.sequence_logps(ctx, ids, mask)
        loss = -(lp.logps.sum() / lp.mask.sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == args.steps - 1:
            print(f"step {step}: token NLL {loss.item():.4f}", flush=True)
    cap.eval()
    test = make_dataset(300, seed=12_345)
    caps = cap.caption([d[0] for d in test])
    acc = get_world("shapes").caption_accuracy([d[0] for d in test], caps)
    cap.save(args.out)
    (Path(args.out) / "TRAINING.md").write_text(
        f"Pretrained by scripts/pretrain_captioner.py {vars(args)} with caption confusions {CONFUSION}.\n\n"
        f"Greedy content accuracy on 300 held-out renders: {acc:.3f}.\n")
    print(f"greedy content accuracy on held-out renders: {acc:.3f}; e.g. {caps[:4]}; saved to {args.out}")


if __name__ == "__main__":
    main()
