"""Run the Diffusion-DPO method family on the demo world in one run and compare them.

All methods start from the same shipped base model, train on data derived from the same oracle-labelled
on-policy candidate pairs (``mmalign demo``'s), use the same steps, batch, beta and lr, and are scored on
the same evaluation prompts and seeds (4 prompts held out of training):

  Diffusion-DPO        the pairs as they are
  DCPO (captioning)    the rejected image captioned by the shapes-world describer (caption_0 / caption_1)
  DCPO (perturbation)  the rejected image captioned by a rule-based perturbation of the prompt (medium)
  DDIM-InPO            x_t from DDIM inversion with the policy, re-derived noise
  FiFA (top 50%)       the pairs ranked by toy_clip margin + prompt quality + diversity, top half kept

PPD and RPO solve different tasks (per-user preferences; a subject), so they get their own experiments
with their own metric, on the same base model:

  PPD   two synthetic users on the same prompts: "small" prefers smaller shapes, "large" larger ones;
        the shape area the tuned model draws for each user embedding, and halfway between them.
  RPO   subject = four renders of one large centred red circle; prompts name red circles; soft-label
        reference-vs-generated pairs from the lambda-harmonic reward at lambda = 0 (toy_clip backbone),
        checkpoint selection by lambda-harmonic at lambda = 0.5.

    python scripts/compare_methods.py [--steps 300] [--out runs/compare]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def table_row(name, te, pairs, steps):
    t = {r["split"]: r for r in te.table}
    hist = te.result.history
    sps = float(np.median([h["train/sec_per_step"] for h in hist[1:]])) if len(hist) > 1 else float("nan")
    return {"method": name, "pairs": pairs, "oracle_all": t["all prompts"]["tuned_score"],
            "oracle_held_out": t["held-out prompts"]["tuned_score"], "accuracy": t["all prompts"]["tuned_accuracy"],
            "win_rate": t["all prompts"]["win_rate"], "train_s": te.train_seconds, "s_per_step": sps, "steps": steps}


def area(img) -> float:
    from mmalign.toyworld.world import analyse

    return analyse(img)["area"]


def ppd_experiment(s, prep, out: Path, steps: int):
    """Two users with opposite size preferences; PPD learns to draw their preferred size."""
    import copy

    from mmalign.demo.experiment import demo_config, sample
    from mmalign.diffusion.data import write_pickapic_parquet
    from mmalign.diffusion.users import interpolate, sample_for_user
    from mmalign.train.diffusion import run
    from mmalign.toyworld.world import is_correct

    pipe = prep.comp.pipeline()
    cand_p = [p for p in prep.train_prompts for _ in range(16)]
    imgs = sample(pipe, cand_p, [90_000 + i for i in range(len(cand_p))], s)
    ok = [is_correct(i, p) for i, p in zip(imgs, cand_p)]
    rows = []
    rng = np.random.default_rng(0)
    for p in prep.train_prompts:  # pairs of correct images of the same prompt with clearly different sizes
        idx = [i for i, q in enumerate(cand_p) if q == p and ok[i]]
        idx.sort(key=lambda i: area(imgs[i]))
        for a, b in zip(idx[: len(idx) // 2], reversed(idx[len(idx) // 2:])):
            if area(imgs[b]) - area(imgs[a]) < 0.03:
                continue
            for user, small_wins in (("small", True), ("large", False)):
                first = bool(rng.random() < 0.5)
                win, lose = (imgs[a], imgs[b]) if small_wins else (imgs[b], imgs[a])
                rows.append({"caption": p, "user_id": user, "jpg_0": win if first else lose,
                             "jpg_1": lose if first else win, "label_0": 1.0 if first else 0.0,
                             "label_1": 0.0 if first else 1.0})
    write_pickapic_parquet(out / "ppd_pairs.parquet", rows)
    cfg = demo_config(s, str(out / "ppd_pairs.parquet"), str(out / "ppd"), [],
                      {"ppd": {"encoder": "toy_clip", "examples_per_user": 4, "n_tokens": 4},
                       "train": {"max_steps": steps, "eval_every": 0}})
    comp = copy.deepcopy(prep.comp)
    t0 = time.time()
    res = run(cfg, components=comp)
    train_s = time.time() - t0
    rec = res.recipe
    tuned = comp.pipeline(rec.unet)
    ev_p = [p for p in prep.prompts for _ in range(4)]
    gens = lambda: [torch.Generator().manual_seed(20_000 + i) for i in range(len(ev_p))]  # noqa: E731
    base_area = float(np.mean([area(i) for i in sample(pipe, ev_p, [20_000 + i for i in range(len(ev_p))], s)]))
    e_s, e_l = rec.user_emb["small"], rec.user_emb["large"]
    areas = {}
    for name, e in (("small", e_s), ("halfway", interpolate(e_s, e_l, 0.5)), ("large", e_l)):
        ims = sample_for_user(tuned, ev_p, e, gens(), steps=s.sample_steps, guidance=s.guidance)
        areas[name] = float(np.mean([area(i) for i in ims]))
    return {"pairs": len(rows), "train_s": train_s, "base_area": base_area, **{f"area_{k}": v for k, v in areas.items()}}


def rpo_experiment(s, prep, out: Path, steps: int):
    """Subject-driven RPO with lambda-harmonic labels and checkpoint selection."""
    import copy

    from mmalign.demo.experiment import demo_config, sample
    from mmalign.toyworld.world import Scene, render
    from mmalign.diffusion.data import write_pickapic_parquet
    from mmalign.diffusion.subject import build_rpo_pairs
    from mmalign.rewards import load_reward

    subj = out / "rpo_subject"
    subj.mkdir(parents=True, exist_ok=True)
    refs = [render(Scene("red", "circle", 17, 16 + dx, 16 + dy)) for dx, dy in ((0, 0), (1, 0), (0, 1), (-1, -1))]
    for i, r in enumerate(refs):
        r.save(subj / f"ref_{i}.png")
    prompts = ["a red circle", "a picture of a red circle", "a red circle on a dark background"]
    (subj / "prompts.txt").write_text("\n".join(prompts) + "\n")
    label_reward = load_reward("lambda_harmonic", model=str(ROOT / "assets/models/toy-clip"), lam=0.0, device="cpu")
    rows = build_rpo_pairs(prep.comp.pipeline(), refs, prompts, label_reward, per_prompt=16, steps=s.sample_steps,
                           guidance=s.guidance, resolution=32)
    write_pickapic_parquet(out / "rpo_pairs.parquet", rows)
    cfg = demo_config(s, str(out / "rpo_pairs.parquet"), str(out / "rpo"), prompts, {
        "loss": {"name": "rpo", "beta": s.beta, "sft_weight": 1.0},
        "data": {"label_mode": "soft", "shared_noise": False},
        "train": {"max_steps": steps, "eval_every": max(1, steps // 6)},
        "validation": {"reward": "lambda_harmonic", "reward_model": str(ROOT / "assets/models/toy-clip"),
                       "reward_args": {"lam": 0.5}, "references": str(subj), "select_best": True,
                       "images_per_prompt": 4}})
    from mmalign.train.diffusion import run

    t0 = time.time()
    res = run(cfg, components=copy.deepcopy(prep.comp))
    ev = [r for r in res.eval_history if "eval/reward" in r]
    sel = load_reward("lambda_harmonic", model=str(ROOT / "assets/models/toy-clip"), lam=0.5, device="cpu")
    dino = load_reward("clip_i", model=str(ROOT / "assets/models/toy-clip"), device="cpu")
    ev_p = [p for p in prompts for _ in range(8)]
    seeds = [30_000 + i for i in range(len(ev_p))]
    base = sample(prep.comp.pipeline(), ev_p, seeds, s)
    from diffusers import UNet2DConditionModel

    # the selected checkpoint (full UNet fine-tune) is exported as a pipeline folder: load its UNet
    best_unet = UNet2DConditionModel.from_pretrained(str(out / "rpo" / "best"), subfolder="unet")
    tuned = sample(prep.comp.pipeline(best_unet), ev_p, seeds, s)
    return {"pairs": len(rows), "train_s": time.time() - t0, "best_step": res.recipe.validator.best_step,
            "val_reward_first": ev[0]["eval/reward"], "val_reward_best": res.recipe.validator.best_reward,
            "lambda_harmonic_base": float(sel.score(base, ev_p, refs).mean()),
            "lambda_harmonic_tuned": float(sel.score(tuned, ev_p, refs).mean()),
            "clip_i_base": float(dino.score(base, references=refs).mean()),
            "clip_i_tuned": float(dino.score(tuned, references=refs).mean()),
            "area_base": float(np.mean([area(i) for i in base])), "area_tuned": float(np.mean([area(i) for i in tuned])),
            "area_subject": float(np.mean([area(i) for i in refs]))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--only", default="", help="comma list of methods to run (default: all)")
    args = ap.parse_args()
    from mmalign.diffusion.captions import add_dual_captions, world_captioner
    from mmalign.diffusion.fifa import fifa_filter
    from mmalign.demo.experiment import demo_config, prepare, train_and_evaluate
    from mmalign.demo.settings import DemoSettings
    from mmalign.diffusion.data import load_pairs_table
    from mmalign.rewards import load_reward
    from mmalign.utils import print_table

    t_all = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    s = DemoSettings(out=str(out), steps=args.steps, eval_seeds=8)
    prep = prepare(s, out)
    pairs = prep.pairs_file
    table = load_pairs_table(pairs)[0]
    add_dual_captions(table, "captioning", captioner=world_captioner("shapes")).to_parquet(str(out / "dcpo_cap.parquet"))
    add_dual_captions(table, "perturbation", "medium", seed=0).to_parquet(str(out / "dcpo_pert.parquet"))
    filtered, fres = fifa_filter(table, load_reward("toy_clip", device="cpu"), fraction=0.5)
    filtered.to_parquet(str(out / "fifa.parquet"))
    val = s.held_out[:3] + prep.train_prompts[:3]
    methods = {
        "Diffusion-DPO": (pairs, {}, prep.pairs),
        "DCPO (captioning)": (str(out / "dcpo_cap.parquet"), {"data": {"dual_captions": True}}, prep.pairs),
        "DCPO (perturbation)": (str(out / "dcpo_pert.parquet"), {"data": {"dual_captions": True}}, prep.pairs),
        "DDIM-InPO": (pairs, {"inversion": {"steps": 10, "eta": 0.1}}, prep.pairs),
        "FiFA (top 50%)": (str(out / "fifa.parquet"), {}, len(filtered)),
    }
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for name, (data, extra, n) in methods.items():
        if only and name not in only:
            continue
        print(f"\n=== {name}", flush=True)
        cfg = demo_config(s, data, str(out / name.split()[0].lower()), val, extra)
        rows.append(table_row(name, train_and_evaluate(s, prep, cfg), n, args.steps))
        (out / "compare_partial.json").write_text(json.dumps({"rows": rows}, indent=1))  # survives a later crash
        print(json.dumps(rows[-1]), flush=True)
    t0 = {"all": float(np.mean(prep.base_scores)), "ok": float(np.mean(prep.base_ok))}
    held = [p in s.held_out for p in prep.eval_p]
    base_held = float(np.mean([x for x, h in zip(prep.base_scores, held) if h]))
    extra = {}
    if not only or "PPD" in only:
        print("\n=== PPD", flush=True)
        extra["ppd"] = ppd_experiment(s, prep, out, args.steps)
        (out / "compare_partial.json").write_text(json.dumps({"rows": rows, **extra}, indent=1))
        print(json.dumps(extra["ppd"]), flush=True)
    if not only or "RPO" in only:
        print("\n=== RPO", flush=True)
        extra["rpo"] = rpo_experiment(s, prep, out, args.steps)
    print(f"\nbase model: oracle {t0['all']:.3f} (held-out prompts {base_held:.3f}), accuracy {t0['ok']:.3f}; "
          f"{args.steps} steps, batch {s.batch_size}, beta {s.beta:g}, lr {s.lr:g}, full UNet, CPU")
    print_table(["method", "pairs", "oracle (all)", "oracle (held-out)", "accuracy", "win rate vs base", "train s",
                 "s/step"],
                [[r["method"], r["pairs"], f"{r['oracle_all']:.3f}", f"{r['oracle_held_out']:.3f}",
                  f"{r['accuracy']:.3f}", f"{r['win_rate']:.3f}", f"{r['train_s']:.0f}", f"{r['s_per_step']:.3f}"]
                 for r in rows])
    if "ppd" in extra:
        p = extra["ppd"]
        print(f"\nPPD ({p['pairs']} pairs, {p['train_s']:.0f}s): mean shape area base {p['base_area']:.4f} | "
              f"user small {p['area_small']:.4f} | halfway {p['area_halfway']:.4f} | user large {p['area_large']:.4f}")
    if "rpo" in extra:
        r = extra["rpo"]
        print(f"\nRPO ({r['pairs']} pairs, {r['train_s']:.0f}s): lambda-harmonic(0.5) base {r['lambda_harmonic_base']:.4f}"
              f" -> selected step {r['best_step']} {r['lambda_harmonic_tuned']:.4f}; CLIP-I {r['clip_i_base']:.4f} -> "
              f"{r['clip_i_tuned']:.4f}; shape area {r['area_base']:.4f} -> {r['area_tuned']:.4f} "
              f"(subject {r['area_subject']:.4f})")
    (out / "compare.json").write_text(json.dumps({"rows": rows, "base": t0, "base_held_out": base_held,
                                                  "fifa": fres.report, **extra}, indent=1))
    print(f"\ntotal {time.time() - t_all:.0f}s -> {out / 'compare.json'}")


if __name__ == "__main__":
    main()
