"""``mmalign data TOOL``: dataset tools.

    mmalign data fifa --data pairs.parquet --reward NAME --fraction 0.1 --out filtered.parquet [--report r.json]
    mmalign data dcpo --data pairs.parquet --strategy perturbation|captioning|hybrid [--level medium]
                      [--captioner BLIP_PATH|world:shapes] --out dual.parquet
    mmalign data rpo-pairs --subject DIR --model PIPELINE --out pairs.parquet [--per-prompt 16]
    mmalign data bdhs --model VLM (--data TABLE | --world-images N [--world shapes]) --out pairs.parquet
    mmalign data relabel --data judged_pairs.jsonl --out augmented.jsonl [--chosen-score C --rejected-score R]
"""
from __future__ import annotations

import json
from pathlib import Path

from mmalign.data.records import DataError

# Library imports are inside run(): building the parser (mmalign --help) must not load torch (~4 s).

OUTSIDE = "let the table name image files outside its own folder (trusted data only)"


def add_arguments(p):
    s = p.add_subparsers(dest="tool", required=True)
    for name, (helptext, add, fn) in TOOLS.items():
        sp = s.add_parser(name, help=helptext, description=helptext)
        add(sp)
        sp.set_defaults(func=fn)


def run(args) -> int:  # pragma: no cover - each tool sets its own func
    return args.func(args)


# ------------------------------------------------------------------ fifa

def _fifa_args(f):
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
    f.add_argument("--allow-outside-root", action="store_true", help=OUTSIDE)


def cmd_fifa(args) -> int:
    from functools import partial

    from mmalign.diffusion.fifa import fifa_filter
    from mmalign.data.images import open_image
    from mmalign.diffusion.data import load_pairs_table
    from mmalign.rewards import load_reward
    from mmalign.utils import print_table

    if not 0.0 < args.fraction <= 1.0:
        raise DataError(f"--fraction must be in (0, 1], got {args.fraction}")
    table, root = load_pairs_table(args.data, allow_outside_root=args.allow_outside_root)
    reward = load_reward(args.reward, model=args.model, tiny=args.tiny)
    out, res = fifa_filter(table, reward, args.fraction, args.alpha, args.gamma, args.k,
                           open_fn=partial(open_image, root=root, allow_outside_root=args.allow_outside_root))
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


# ------------------------------------------------------------------ dcpo

def _dcpo_args(d):
    d.add_argument("--data", required=True)
    d.add_argument("--strategy", choices=["captioning", "perturbation", "hybrid"], required=True)
    d.add_argument("--level", choices=["weak", "medium", "strong"], default="medium")
    d.add_argument("--captioner", default=None, help="BLIP folder / hub id, or world:NAME (a world's oracle describer)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", required=True)
    d.add_argument("--allow-outside-root", action="store_true", help=OUTSIDE)


def captioner_from(spec: str | None):
    from mmalign.diffusion.captions import world_captioner
    from mmalign.models.captioner import load_captioner

    if spec is None:
        return None
    if spec.startswith("world:"):
        return world_captioner(spec.removeprefix("world:"))
    return load_captioner(spec).caption


def cmd_dcpo(args) -> int:
    from functools import partial

    from mmalign.diffusion.captions import add_dual_captions
    from mmalign.data.images import open_image
    from mmalign.diffusion.data import load_pairs_table

    table, root = load_pairs_table(args.data, allow_outside_root=args.allow_outside_root)
    out = add_dual_captions(table, args.strategy, args.level, captioner_from(args.captioner), args.seed,
                            open_fn=partial(open_image, root=root, allow_outside_root=args.allow_outside_root))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    out.to_parquet(args.out)
    ex = out[0]
    print(f"{len(out)} pairs with dual captions ({args.strategy}, {args.level}); e.g. caption_0={ex['caption_0']!r} "
          f"caption_1={ex['caption_1']!r} -> {args.out}")
    return 0


# ------------------------------------------------------------------ rpo-pairs

def _rpo_args(r):
    r.add_argument("--subject", required=True, help="folder with subject images and prompts.txt")
    r.add_argument("--model", required=True, help="diffusers pipeline folder / hub id")
    r.add_argument("--kind", choices=["sd", "sdxl", "sd3", "flux"], default="sd")
    r.add_argument("--reward-model", default=None, help="backbone for lambda_harmonic (default CLIP ViT-B/32)")
    r.add_argument("--tiny-reward", action="store_true")
    r.add_argument("--per-prompt", type=int, default=16)
    r.add_argument("--steps", type=int, default=30)
    r.add_argument("--guidance", type=float, default=7.5)
    r.add_argument("--resolution", type=int, default=512)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--out", required=True)


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


# ------------------------------------------------------------------ bdhs

def _bdhs_args(p):
    p.add_argument("--model", help="VLM folder / hub id (LLaVA-style)")
    p.add_argument("--tiny", action="store_true", help="a random tiny LLaVA (smoke runs)")
    p.add_argument("--data", help="table with prompt, image, answer columns")
    p.add_argument("--world", default="shapes", help="a plug-in world (mmalign.worlds) for --world-images")
    p.add_argument("--world-images", type=int, default=0, help="N rendered scenes x the world's QA questions")
    p.add_argument("--keep", type=float, default=0.01, help="share of image tokens left visible (1 - rho_th)")
    p.add_argument("--threshold", type=float, default=0.97)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--allow-outside-root", action="store_true", help=OUTSIDE)


def cmd_bdhs(args) -> int:
    if not args.model and not args.tiny:
        raise DataError("pass --model (a VLM folder / hub id) or --tiny")
    if (args.data is None) == (args.world_images == 0):
        raise DataError("pass exactly one of --data or --world-images")
    import datasets

    from mmalign.data.images import open_image
    from mmalign.data.records import load_table, require_columns, table_root
    from mmalign.vl.bdhs import bdhs_dataset
    from mmalign.vl.models import load_vlm, tiny_llava
    from mmalign.worlds import get_world

    model, proc = tiny_llava() if args.tiny else load_vlm(args.model)
    if args.world_images:
        rows = get_world(args.world).qa_rows(args.world_images, args.seed)
    else:
        t = load_table(args.data)
        require_columns(t, ["prompt", "image", "answer"], args.data, "BDHS")
        root = table_root(args.data)
        rows = [{"prompt": r["prompt"], "answer": r["answer"],
                 "image": open_image(r["image"], root, args.allow_outside_root, f"{args.data}: row {i}")}
                for i, r in enumerate(t)]
    out = bdhs_dataset(model, proc, rows, args.seed, keep=args.keep, threshold=args.threshold,
                       iterations=args.iterations, max_new_tokens=args.max_new_tokens)
    datasets.Dataset.from_list(out).to_parquet(args.out)
    print(f"{len(out)} BDHS pairs -> {args.out}; e.g. chosen={out[0]['chosen']!r} rejected={out[0]['rejected']!r}")
    return 0


# ------------------------------------------------------------------ relabel

def _relabel_args(r):
    r.add_argument("--data", required=True, help="pairs with judge scores (.jsonl/.parquet/saved dataset)")
    r.add_argument("--chosen-score", default="score_chosen")
    r.add_argument("--rejected-score", default="score_rejected")
    r.add_argument("--template", default=None, help="goal-conditioned prompt, with {prompt} and {score}")
    r.add_argument("--out", required=True, help=".jsonl or .parquet")


def cmd_relabel(args) -> int:
    from mmalign.data.records import load_table
    from mmalign.data.relabel import DEFAULT_TEMPLATE, reward_augment
    from mmalign.utils import print_table

    rows, rep = reward_augment(load_table(args.data).to_list(), args.chosen_score, args.rejected_score,
                               args.template or DEFAULT_TEMPLATE, source=args.data)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(out))
    else:
        out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print_table(["pairs in", "contradicting (dropped)", "ties (kept)", "rows out"],
                [[rep["pairs"], rep["dropped_contradicting"], rep["ties_kept"], rep["rows_out"]]])
    print(f"-> {out}")
    return 0


TOOLS = {
    "fifa": ("FiFA: keep the most informative, high-quality, diverse pairs", _fifa_args, cmd_fifa),
    "dcpo": ("DCPO: a caption for each image of a pair", _dcpo_args, cmd_dcpo),
    "rpo-pairs": ("RPO: reference-vs-generated pairs with lambda-harmonic Bernoulli labels", _rpo_args, cmd_rpo_pairs),
    "bdhs": ("BDHS: image-blinded rejected answers for VLM DPO, no annotation", _bdhs_args, cmd_bdhs),
    "relabel": ("reward-augmented relabelling: each judged pair twice, goal-conditioned (arXiv 2410.08067)",
                _relabel_args, cmd_relabel),
}
