"""Pretrain the tiny text policy shipped in assets/models/toy-lm: a 2-layer GPT-2 (tiny-bpe tokenizer) trained by
maximum likelihood on toy-world answers of which only ``--good`` (default 15%) use pleasant adjectives -- so
the reference policy puts little mass where the reward (mmalign.toyworld.text.pleasantness) is high, the
setting of the on-policy vs offline experiment (scripts/onpolicy_vs_offline.py) and the online configs.

    python scripts/pretrain_toy_lm.py [--steps 800 --good 0.15 --out assets/models/toy-lm]
"""
import argparse
import json
import random
from pathlib import Path

import torch

from mmalign.models.lm import load_tokenizer
from mmalign.toyworld.text import ANSWERS, BAD, GOOD, PROMPTS, TOPICS, pleasantness


def sample_text(rng: random.Random, good_share: float) -> tuple[str, str]:
    t = rng.choice(TOPICS[:30])
    pool = GOOD if rng.random() < good_share else BAD
    a, b = rng.sample(pool, 2)
    return rng.choice(PROMPTS).format(t=t), rng.choice(ANSWERS).format(t=t, a=a, b=b)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="assets/models/toy-lm")
    ap.add_argument("--steps", type=int, default=800)  # the shipped assets/models/toy-lm
    ap.add_argument("--good", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = load_tokenizer(None)
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=64, n_head=4, n_positions=128,
                                       bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(args.steps):
        rows = [sample_text(rng, args.good) for _ in range(32)]
        enc = [tok(p + a, add_special_tokens=False).input_ids + [tok.eos_token_id] for p, a in rows]
        n_prompt = [len(tok(p, add_special_tokens=False).input_ids) for p, _ in rows]
        T = max(len(e) for e in enc)
        ids = torch.full((32, T), tok.pad_token_id)
        labels = torch.full((32, T), -100)
        for i, (e, n) in enumerate(zip(enc, n_prompt)):
            ids[i, : len(e)] = torch.tensor(e)
            labels[i, n: len(e)] = torch.tensor(e[n:])  # learn the answers only
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id) | (labels != -100), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 300 == 0:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)
    model.eval()
    from mmalign.models.lm import sample_completions

    test = [p.format(t=t) for t in TOPICS[30:] for p in PROMPTS]
    samples = sample_completions(model, tok, test, 8, max_new_tokens=16, seed=1)
    mean = sum(pleasantness(p, y) for p, ys in zip(test, samples) for y in ys) / (8 * len(test))
    print(f"held-out mean pleasantness of samples: {mean:.3f}; e.g. {samples[0][:2]}")
    out = Path(args.out)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "TRAINING.md").write_text(f"Trained by scripts/pretrain_toy_lm.py {json.dumps(vars(args))}; held-out mean "
                                     f"pleasantness of 8 samples per prompt: {mean:.3f}.\n")


if __name__ == "__main__":
    main()
