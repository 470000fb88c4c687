"""Build the shipped toy text-preference sets in assets/data/toy_prefs/ (deterministic).

The world: a question about a topic; preferred answers describe it with pleasant adjectives,
dispreferred ones with unpleasant adjectives. Train and test use *disjoint topics*, so held-out
reward accuracy measures generalisation to unseen subjects, not memorisation of pairs.

Formats written (one JSONL each, train and test):
  pairs    {prompt, chosen, rejected}                  DPO, IPO, ... (TRL's schema)
  joint    {prompt_chosen, chosen, prompt_rejected, rejected}   DOVE
  binary   {prompt, completion, label}                 KTO, BCO
  ranked   {prompt, completions: [..], scores: [..]}   LiPO, PRO (score = number of pleasant words)
  negatives {prompt, rejected, samples: [..]}          D2O

    python scripts/make_toy_prefs.py [--out assets/data/toy_prefs]
"""
import argparse
import json
import random
from pathlib import Path

from mmalign.toyworld.text import ANSWERS, BAD, GOOD, PROMPTS, TOPICS  # the world's vocabulary


def answer(rng, t, a, b):
    return rng.choice(ANSWERS).format(t=t, a=a, b=b)


def build(topics, good, bad, n, seed):
    rng = random.Random(seed)
    rows = {k: [] for k in ("pairs", "joint", "binary", "ranked", "negatives")}
    for _ in range(n):
        t = rng.choice(topics)
        prompt = rng.choice(PROMPTS).format(t=t)
        g1, g2 = rng.sample(good, 2)
        b1, b2 = rng.sample(bad, 2)
        chosen, rejected = answer(rng, t, g1, g2), answer(rng, t, b1, b2)
        rows["pairs"].append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        t2 = rng.choice(topics)
        p2 = rng.choice(PROMPTS).format(t=t2)
        rows["joint"].append({"prompt_chosen": prompt, "chosen": chosen, "prompt_rejected": p2,
                              "rejected": answer(rng, t2, b1, b2)})
        lab = rng.random() < 0.5
        rows["binary"].append({"prompt": prompt, "completion": chosen if lab else rejected, "label": bool(lab)})
        comps = [answer(rng, t, g1, g2), answer(rng, t, g1, b1), answer(rng, t, b2, g2), answer(rng, t, b1, b2)]
        scores = [2, 1, 1, 0]
        order = list(range(4))
        rng.shuffle(order)
        rows["ranked"].append({"prompt": prompt, "completions": [comps[i] for i in order],
                               "scores": [scores[i] for i in order]})
        rows["negatives"].append({"prompt": prompt, "rejected": rejected,
                                  "samples": [answer(rng, t, *rng.sample(good, 2)) for _ in range(2)]})
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="assets/data/toy_prefs")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=200)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # disjoint topics between splits: held-out accuracy measures generalisation to unseen subjects
    splits = {"train": build(TOPICS[:30], GOOD, BAD, args.n_train, 0),
              "test": build(TOPICS[30:], GOOD, BAD, args.n_test, 1)}
    for split, rows in splits.items():
        for fmt, rs in rows.items():
            with open(out / f"{fmt}_{split}.jsonl", "w") as f:
                for r in rs:
                    f.write(json.dumps(r) + "\n")
    print(f"wrote {sum(len(r) for s in splits.values() for r in s.values())} rows to {out}")


if __name__ == "__main__":
    main()
