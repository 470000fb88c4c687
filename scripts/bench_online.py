"""Speed of the online loop on this machine, in one run (issue #23):

1. rollouts -- images per second of the diffusers pipeline call (``output_type="latent"``: no decoding) and of
   mmalign's ``StepSampler`` at the same steps, resolution, batch and guidance: as the ODE sampler (online DPO,
   NFT, AWM) and with every step stochastic and its log-prob recorded (GRPO); interleaved repeats, median and
   spread. Recording log-probs must not make sampling slower than the plain pipeline.
2. training -- seconds per optimiser step and per trained image of each method (online DPO pairs, GRPO with a
   window of 2 SDE steps, NFT, AWM) on a round of the same model, after a warm-up step.

On the shipped shapes models (shapes-sd: a UNet; shapes-sd3: a flow transformer), 32 px, CPU unless CUDA is there.
Prints a table and one JSON line (``rollout_ratio_vs_pipeline``: ours / pipeline images per second).

    python scripts/bench_online.py [--models sd,sd3 --batch 16 --steps 20 --repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODELS = {"sd": ROOT / "assets/models/shapes-sd", "sd3": ROOT / "assets/models/shapes-sd3"}


def rollouts(model: str, a) -> dict:
    from mmalign.diffusion.families import family_for
    from mmalign.diffusion.models import load_components
    from mmalign.diffusion.sampler import StepSampler
    from mmalign.diffusion.sampling import detect_kind
    from mmalign.toyworld.world import all_prompts

    comp = load_components(detect_kind(str(MODELS[model])), str(MODELS[model]))
    fam, pipe = family_for(comp), comp.pipeline(scheduler="ddim")
    comp.denoiser.train()  # as mmalign's rollouts run (their mode is the training recomputation's)
    prompts = (all_prompts() * a.batch)[: a.batch]
    seeds = list(range(a.batch))
    sampler = StepSampler(fam, comp, a.steps, a.guidance, 32, pipe.vae_scale_factor)
    sde = list(range(a.steps - (1 if fam.flow else 0)))  # every step GRPO can train
    paths = {
        "pipeline": lambda: pipe(prompts, num_inference_steps=a.steps, guidance_scale=a.guidance, height=32, width=32,
                                 output_type="latent", generator=[torch.Generator().manual_seed(s) for s in seeds]),
        "mmalign_ode": lambda: sampler.sample(comp.denoiser, pipe, prompts, seeds),
        "mmalign_sde_logprobs": lambda: sampler.sample(comp.denoiser, pipe, prompts, seeds, sde),
    }
    times = {k: [] for k in paths}
    with torch.no_grad():
        for f in paths.values():  # warm-up
            f()
        for _ in range(a.repeats):  # interleaved, so that drifts of the machine hit every path alike
            for k, f in paths.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    return {k: {"images_per_s": a.batch / statistics.median(v), "seconds": [round(x, 3) for x in v]} for k, v in times.items()}


def training(model: str, method: str, a) -> dict:
    """Seconds per optimiser step of ``method`` (median of ``a.train_steps`` steps after the first, which samples)."""
    from mmalign.config import config_from_dict
    from mmalign.train.diffusion import run
    from mmalign.train.sections import RECIPES

    sys.path.insert(0, str(ROOT / "scripts"))
    from online_experiment import config, train_prompts

    with tempfile.TemporaryDirectory() as d:
        a.rounds, a.rl_steps = 1, a.train_steps + 1
        a.steps = a.train_steps + 1
        cfg = config(model, method, Path(d) / "run", train_prompts(Path(d)), 0, a)
        cfg["online"].update(eval_prompts=str(train_prompts(Path(d))), eval_seeds=1)
        cfg["train"]["log_every"] = 1
        res = run(config_from_dict(cfg, RECIPES))
    per_step = statistics.median(h["train/sec_per_step"] for h in res.history[1:])
    rows = cfg["train"]["batch_size"]
    return {"sec_per_step": per_step, "rows_per_step": rows,
            "images_per_row": 2 if method in ("offline", "online_dpo") else 1, "sec_per_image": per_step / (
                rows * (2 if method in ("offline", "online_dpo") else 1))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd,sd3")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=4)
    p.add_argument("--methods", default="online_dpo,grpo,nft,awm")
    a = p.parse_args()
    a.samples, a.beta, a.lr, a.rl_lr, a.reward, a.eval_seeds, a.guard_patience = 8, 2500.0, 2e-5, 2e-5, \
        "reward:toy_clip", 1, 0
    from mmalign.utils import print_table

    t0 = time.perf_counter()
    out = {"device": "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)",
           "batch": a.batch, "steps": a.steps, "guidance": a.guidance}
    rows = []
    for m in a.models.split(","):
        r = rollouts(m, a)
        base = r["pipeline"]["images_per_s"]
        out[f"{m}/rollout"] = {k: round(v["images_per_s"], 2) for k, v in r.items()}
        out[f"{m}/rollout_ratio_vs_pipeline"] = {k: round(v["images_per_s"] / base, 3) for k, v in r.items()
                                                if k != "pipeline"}
        rows += [[f"shapes-{m}", f"rollout: {k}", f"{v['images_per_s']:.1f} img/s", f"{v['images_per_s'] / base:.2f}x",
                  " ".join(f"{s:.2f}" for s in v["seconds"])] for k, v in r.items()]
        for method in a.methods.split(","):
            t = training(m, method, a)
            out[f"{m}/train/{method}"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in t.items()}
            rows.append([f"shapes-{m}", f"train: {method}", f"{t['sec_per_step']:.3f} s/step",
                         f"{t['sec_per_image'] * 1000:.1f} ms/image", f"{t['rows_per_step']} rows"])
    out["total_s"] = round(time.perf_counter() - t0, 1)
    print_table(["model", "what", "speed", "vs pipeline / per image", "runs"], rows)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
