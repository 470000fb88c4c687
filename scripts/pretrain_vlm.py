"""Pretrain the demo VLM (assets/models/shapes-llava): a tiny LlavaForConditionalGeneration on shapes-world QA.

CLIP ViT (32 px, 16 image tokens) + 2-layer Llama over the tiny BPE vocabulary, built from configs and
trained by supervised fine-tuning on (image, question, answer) with *systematically* wrong colour words in
the answers -- orange shapes are called "red" and purple ones "blue" 60% of the time (as for the demo
captioner) -- so the greedy model hallucinates a colour the image does not show for those shapes, the
kind of language-prior hallucination BDHS + DPO is meant to remove.

    python scripts/pretrain_vlm.py            # a few minutes on 2 CPU cores
"""
import argparse
import json
import random
from pathlib import Path

import torch

from mmalign.toyworld.qa import QUESTIONS, answer, evaluate_qa
from mmalign.toyworld.world import make_dataset
from mmalign.paths import ASSETS
from mmalign.vl.models import encode_prompt, tiny_llava

CONFUSION = {"orange": ("red", 0.6), "purple": ("blue", 0.6)}


def noisy_answer(scene, kind, rng):
    c = scene.color
    if c in CONFUSION and rng.random() < CONFUSION[c][1]:
        c = CONFUSION[c][0]
    return answer(scene, kind, color=c)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ASSETS / "models" / "shapes-llava"))
    ap.add_argument("--scenes", type=int, default=3000)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--patch", type=int, default=4, help="ViT patch size (8: 16 image tokens, 4: 64)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    model, proc = tiny_llava(seed=args.seed, hidden=args.hidden, layers=2, patch_size=args.patch)
    tok = proc.tokenizer
    pool = []  # (prompt ids, pixel values, scene, kind), tokenised once
    for im, _, sc in make_dataset(args.scenes, seed=args.seed + 1):
        for kind, q in QUESTIONS.items():
            ids, pix = encode_prompt(proc, q, im)
            pool.append((ids, pix, sc, kind))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    model.train()
    for step in range(args.steps):
        seqs, labels, pix = [], [], []
        for ids, px, sc, kind in (pool[rng.randrange(len(pool))] for _ in range(args.batch)):
            a = tok(noisy_answer(sc, kind, rng), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append(ids + a)
            labels.append([-100] * len(ids) + a)
            pix.append(px)
        t = max(map(len, seqs))
        input_ids = torch.tensor([s + [tok.pad_token_id] * (t - len(s)) for s in seqs])
        attn = torch.tensor([[1] * len(s) + [0] * (t - len(s)) for s in seqs])
        lab = torch.tensor([x + [-100] * (t - len(x)) for x in labels])
        loss = model(input_ids=input_ids, attention_mask=attn, pixel_values=torch.stack(pix), labels=lab).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: answer NLL {loss.item():.4f}", flush=True)
    model.eval()
    ev = evaluate_qa(model, proc, n_scenes=100)
    model.save_pretrained(args.out)
    proc.save_pretrained(args.out)
    (Path(args.out) / "TRAINING.md").write_text(
        f"Pretrained by scripts/pretrain_vlm.py {vars(args)} with answer colour confusions {CONFUSION}.\n\n"
        f"Greedy answers on 100 held-out renders x 3 questions: {json.dumps(ev)}\n")
    print(f"held-out QA: {ev}; saved to {args.out}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
