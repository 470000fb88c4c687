"""``mmalign data ...``: dataset tools.

    mmalign data fifa --data pairs.parquet --reward NAME --fraction 0.1 --out filtered.parquet [--report r.json]
    mmalign data dcpo --data pairs.parquet --strategy perturbation|captioning|hybrid [--level medium]
                      [--captioner BLIP_PATH|shapes-oracle] --out dual.parquet
    mmalign data rpo-pairs --subject DIR --model PIPELINE --out pairs.parquet [--per-prompt 16]
"""
from __future__ import annotations

import json
from pathlib import Path


def add_parsers(sub):
    p = sub.add_parser("data", help="dataset tools: FiFA filtering, DCPO captions, RPO pairs, BDHS")
    s = p.add_subparsers(dest="tool", required=True)

    f = s.add_parser("fifa", help="FiFA: keep the most informative, high-quality, diverse pairs")
    f.add_argument("--data", required=True)
    f.add_argument("--reward", required=True, help="proxy reward for the preference margin (REWARDS name)")
    f.add_argument("--model", default=None)
    f.add_argument("--tiny", action="store_true")
    f.add_argument("--fraction", type=float, default=0.1)
    f.add_argument("--alpha", type=float, default=0.5, help="weight of prompt text quality")
    f.add_argument("--gamma", type=float, default=0.5, help="weight of prompt diversity (log k-NN distance)")
    f.add_argument("--k", type=int, default=5)
    f.add_argument("--out", required=True)
    f.add_argument("--report", default=None)
    f.set_defaults(func=cmd_fifa)

    d = s.add_parser("dcpo", help="DCPO: a caption for each image of a pair")
    d.add_argument("--data", required=True)
    d.add_argument("--strategy", choices=["captioning", "perturbation", "hybrid"], required=True)
    d.add_argument("--level", choices=["weak", "medium", "strong"], default="medium")
    d.add_argument("--captioner", default=None, help="BLIP folder / hub id, or 'shapes-oracle'")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", required=True)
    d.set_defaults(func=cmd_dcpo)

    r = s.add_parser("rpo-pairs", help="RPO: reference-vs-generated pairs with lambda-harmonic Bernoulli labels")
    r.add_argument("--subject", required=True, help="folder with subject images and prompts.txt")
    r.add_argument("--model", required=True, help="diffusers pipeline folder / hub id")
    r.add_argument("--kind", choices=["sd", "sdxl"], default="sd")
    r.add_argument("--reward-model", default=None, help="backbone for lambda_harmonic (default CLIP ViT-B/32)")
    r.add_argument("--tiny-reward", action="store_true")
    r.add_argument("--per-prompt", type=int, default=16)
    r.add_argument("--steps", type=int, default=30)
    r.add_argument("--guidance", type=float, default=7.5)
    r.add_argument("--resolution", type=int, default=512)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", required=True)
    r.set_defaults(func=cmd_rpo_pairs)

    from mmalign.vl.bdhs import add_parser as add_bdhs

    add_bdhs(s)


def _table(path):
    from mmalign.diffusion.data import load_pairs_table

    table, _ = load_pairs_table(path)
    return table


def cmd_fifa(args) -> int:
    from mmalign.data.fifa import fifa_filter
    from mmalign.rewards import load_reward
    from mmalign.utils import print_table

    table = _table(args.data)
    reward = load_reward(args.reward, model=args.model, tiny=args.tiny)
    out, res = fifa_filter(table, reward, args.fraction, args.alpha, args.gamma, args.k)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.to_parquet(args.out)
    rep = res.report
    print_table(["", "all pairs", "selected"],
                [["pairs", rep["rows"], rep["selected"]],
                 ["mean margin", f"{rep['margin_mean_all']:.4f}", f"{rep['margin_mean_selected']:.4f}"],
                 ["mean prompt quality", f"{rep['quality_mean_all']:.3f}", f"{rep['quality_mean_selected']:.3f}"],
                 ["unique prompts", rep["unique_prompts_all"], rep["unique_prompts_selected"]]])
    if args.report:
        Path(args.report).write_text(json.dumps(rep, indent=1))
    print(f"-> {args.out}")
    return 0


def load_captioner(spec: str | None):
    if spec is None:
        return None
    if spec == "shapes-oracle":
        from mmalign.data.captions import shapes_oracle_captioner

        return shapes_oracle_captioner
    from mmalign.models.captioner import load_captioner as load

    return load(spec).caption


def cmd_dcpo(args) -> int:
    from mmalign.data.captions import add_dual_captions

    table = _table(args.data)
    out = add_dual_captions(table, args.strategy, args.level, load_captioner(args.captioner), args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.to_parquet(args.out)
    ex = out[0]
    print(f"{len(out)} pairs with dual captions ({args.strategy}, {args.level}); e.g. caption_0={ex['caption_0']!r} "
          f"caption_1={ex['caption_1']!r} -> {args.out}")
    return 0


def cmd_rpo_pairs(args) -> int:
    from mmalign.diffusion.data import write_pickapic_parquet
    from mmalign.diffusion.models import load_components
    from mmalign.diffusion.subject import build_rpo_pairs, load_subject_folder
    from mmalign.rewards import load_reward

    refs, prompts = load_subject_folder(args.subject)
    pipe = load_components(args.kind, args.model).pipeline()
    reward = load_reward("lambda_harmonic", model=args.reward_model, tiny=args.tiny_reward, lam=0.0)
    rows = build_rpo_pairs(pipe, refs, prompts, reward, args.per_prompt, args.seed, args.steps, args.guidance,
                           args.resolution)
    write_pickapic_parquet(args.out, rows)
    ys = [r["label_0"] for r in rows]
    print(f"{len(rows)} RPO pairs for {len(prompts)} prompts x {args.per_prompt}; reference preferred in "
          f"{sum(ys):.0f} -> {args.out} (train with data.label_mode=soft, loss rpo)")
    return 0
