"""``mmalign sample``: images for prompts x seeds from a diffusers pipeline (+ LoRA), resumable, with the
``metadata.jsonl`` that ``mmalign score`` and ``mmalign eval`` read.

    mmalign sample --model PIPELINE [--lora DIR] --prompts FILE|SET --seeds 0 1 2 --out DIR
                   [--steps 30 --guidance 5 --resolution 512 --batch-size 8]
"""
from __future__ import annotations

from mmalign.cli.checks import check_positive, check_resolution

# Library imports are inside run(): building the parser (mmalign --help) must not load torch (~4 s).


def add_arguments(p):
    p.add_argument("--model", required=True, help="diffusers pipeline folder or hub id (SD 1.5/2.1, SDXL, SD3, Flux)")
    p.add_argument("--lora", default=None, help="a LoRA folder (mmalign's export or any diffusers LoRA)")
    p.add_argument("--prompts", required=True, help="a .txt / .jsonl / .csv / .parquet file, or a prompt set: "
                                                     "shapes, partiprompts, hpdv2-photo, ...")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one image per prompt and seed")
    p.add_argument("--max-prompts", type=int, default=None, help="only the first N prompts")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--resolution", type=int, default=None, help="default: the model's")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")


def run(args) -> int:
    import torch

    from mmalign.data.prompts import load_prompts
    from mmalign.diffusion.sampling import load_pipeline
    from mmalign.eval.sampling import made_by, sample_to_folder

    check_positive(args, "steps", "batch_size")
    check_resolution(args.resolution)
    prompts = load_prompts(args.prompts)[: args.max_prompts]
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe, kind = load_pipeline(args.model, args.lora, device=dev, dtype=getattr(torch, args.dtype))
    rows = sample_to_folder(pipe, prompts, args.seeds, args.out, args.steps, args.guidance, args.resolution,
                            args.batch_size, meta=made_by(args.model, args.lora, kind, args.dtype))
    print(f"{len(rows)} images ({len(prompts)} prompts x {len(args.seeds)} seeds, {kind}) -> {args.out} "
          f"(+ metadata.jsonl)")
    return 0
