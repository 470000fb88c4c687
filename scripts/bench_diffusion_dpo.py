"""Diffusion-DPO step time and peak memory: a naive baseline vs mmalign's configured path, same run.

Baseline ("naive", written the way the public reference scripts do it -- Salesforce train.py):
full UNet fine-tune with AdamW, a second full fp32 UNet as the reference, and every step the VAE
encodes chosen and rejected images and the text encoder encodes the prompt.

mmalign paths, through the real recipe and training loop (``mmalign.train.diffusion``):
  lora         one UNet, LoRA adapters, reference = adapters disabled; cached latents + text embeddings
  full+precomp full UNet fine-tune, reference precomputed before training (no second UNet in memory),
               cached latents + embeddings
Both put chosen and rejected through one forward and use SDPA; --gc adds gradient checkpointing,
--compile torch.compile, and on CUDA everything runs under bf16 autocast (the baseline too).

Each path runs in its own subprocess so peak memory (CUDA max allocated, or peak RSS on CPU) is its
own. Prints a table, the ratios against the baseline, and one JSON line.

    python scripts/bench_diffusion_dpo.py --size sd15 --latent 32          # the CPU target (~4 min)
    python scripts/bench_diffusion_dpo.py --size sd15 --latent 32 --paths naive,lora,full+precomp
    python scripts/bench_diffusion_dpo.py --size sdxl --latent 128 --gc    # GPU, 1024 px
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {
    # UNet2DConditionModel configs of the real models (random weights), plus a tiny one
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")),
    "sd15": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8),
    "sdxl": dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=(5, 10, 20), use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}
TEXT = {  # CLIP text encoders of the real models
    "tiny": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
    "sd15": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768),
    "sdxl": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768),
    "sdxl2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  projection_dim=1280, hidden_act="gelu"),
}
VAE = {"tiny": dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32),
       "sd15": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32),
       "sdxl": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32)}


def components(size: str, latent: int):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mmalign.diffusion.models import TINY_CLIP_TOKENIZER, Components

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(TINY_CLIP_TOKENIZER))
    tok.model_max_length = 77

    def te_cfg(kind):
        return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **TEXT[kind])

    unet = UNet2DConditionModel(sample_size=latent, **SIZES[size])
    vae = AutoencoderKL(latent_channels=4, **VAE[size])
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                          clip_sample=False)
    te = CLIPTextModel(te_cfg("sd15" if size == "sdxl" else size))
    comp = Components("sdxl" if size == "sdxl" else "sd", unet, vae, te, tok, sched)
    if size == "sdxl":
        comp.text_encoder_2 = CLIPTextModelWithProjection(te_cfg("sdxl2"))
        comp.tokenizer_2 = tok
    return comp


def image_px(size: str, latent: int) -> int:
    return latent * (2 if size == "tiny" else 8)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


# ------------------------------------------------------------------ naive baseline (child process)


def run_naive(size: str, latent: int, steps: int, batch: int) -> dict:
    import copy

    import torch.nn.functional as F

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    comp = components(size, latent)
    unet = comp.unet.to(dev).train()
    ref = copy.deepcopy(unet).eval().requires_grad_(False)  # a second full fp32 UNet
    vae, te = comp.vae.to(dev).requires_grad_(False), comp.text_encoder.to(dev).requires_grad_(False)
    te2 = comp.text_encoder_2.to(dev).requires_grad_(False) if comp.text_encoder_2 is not None else None
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-8)
    px = image_px(size, latent)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch, 2, 3, px, px, generator=g).to(dev) * 2 - 1
    ids = torch.randint(0, 49408, (batch, 77), generator=g).to(dev)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    times = []
    for step in range(steps + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with amp:
            with torch.no_grad():  # encoded every step, chosen and rejected
                lat = vae.encode(torch.cat([pixels[:, 0], pixels[:, 1]])).latent_dist.sample() * 0.18215
                out = te(ids, output_hidden_states=True)
                emb = out.last_hidden_state if te2 is None else torch.cat(
                    [out.hidden_states[-2], te2(ids, output_hidden_states=True).hidden_states[-2]], -1)
                emb = emb.repeat(2, 1, 1)
            noise = torch.randn_like(lat[:batch]).repeat(2, 1, 1, 1)
            t = torch.randint(0, 1000, (batch,), device=dev).repeat(2)
            noisy = comp.noise_scheduler.add_noise(lat, noise, t)
            kw = {}
            if te2 is not None:
                kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2 * batch, 1280, device=dev),
                                           "time_ids": torch.tensor([[px, px, 0, 0, px, px]] * 2 * batch, device=dev)}
            pred = unet(noisy, t, encoder_hidden_states=emb, **kw).sample
            with torch.no_grad():
                ref_pred = ref(noisy, t, encoder_hidden_states=emb, **kw).sample
            mse = ((pred.float() - noise.float()) ** 2).mean(dim=(1, 2, 3))
            ref_mse = ((ref_pred.float() - noise.float()) ** 2).mean(dim=(1, 2, 3))
            mw, ml = mse.chunk(2)
            rw, rl = ref_mse.chunk(2)
            loss = -F.logsigmoid(-0.5 * 5000 * ((mw - ml) - (rw - rl))).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"sec_per_step": statistics.median(times[1:]), "peak_mb": peak_memory_mb(),
            "trainable": sum(p.numel() for p in unet.parameters())}


# ------------------------------------------------------------------ mmalign path (child process)


def run_mmalign(size: str, latent: int, steps: int, batch: int, mode: str, gc: bool, compile_: bool,
                cache: bool = True) -> dict:
    from accelerate import Accelerator

    from mmalign.config import config_from_dict
    from mmalign.toyworld.world import synthetic_pairs
    from mmalign.diffusion.data import write_pickapic_parquet
    from mmalign.train.sections import RECIPES
    from mmalign.train.diffusion import DiffusionRecipe
    from mmalign.train.loop import train

    px = image_px(size, latent)
    tmp = Path(tempfile.mkdtemp(prefix="mmalign-bench-"))
    # exactly the rows the timed steps read: the cache build (part of setup, reported apart) stays small
    write_pickapic_parquet(tmp / "pairs.parquet", synthetic_pairs(batch * (steps + 1), seed=0, image_size=px))
    cuda = torch.cuda.is_available()
    model = {"kind": "sdxl" if size == "sdxl" else "sd", "name_or_path": "unused", "gradient_checkpointing": gc,
             "compile": compile_}
    if mode == "lora":
        model["lora"] = {"r": 8, "alpha": 8}
    else:
        model["reference"] = "precomputed"
    cfg = config_from_dict({
        "recipe": "diffusion", "model": model,
        "data": {"train": str(tmp / "pairs.parquet"), "resolution": px,
                 "cache_dir": str(tmp / "cache") if cache else None, "random_flip": False,
                 **({"noise_draws": 1} if mode != "lora" else {})},
        "loss": {"name": "dpo", "beta": 5000},
        "train": {"output_dir": str(tmp / "run"), "max_steps": steps + 1, "batch_size": batch, "lr": 1e-8,
                  "log_every": 1, "progress": False, "report_to": ["jsonl"], "max_grad_norm": None,
                  "mixed_precision": "bf16" if cuda else "no"},
    }, RECIPES)
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not cuda)
    t_setup = time.perf_counter()
    recipe = DiffusionRecipe(cfg, acc, components=components(size, latent))
    setup = time.perf_counter() - t_setup  # includes building the latent/text cache and any precompute
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    res = train(recipe, cfg.train, acc)
    times = [r["train/sec_per_step"] for r in res.history][1:]
    return {"sec_per_step": statistics.median(times), "peak_mb": peak_memory_mb(), "setup_s": setup,
            "trainable": sum(p.numel() for p in recipe.trainable_parameters())}


def child(args) -> None:
    torch.manual_seed(0)
    if args.path == "naive":
        out = run_naive(args.size, args.latent, args.steps, args.batch)
    else:
        out = run_mmalign(args.size, args.latent, args.steps, args.batch, args.path, args.gc, args.compile,
                          not args.no_cache)
    print("RESULT " + json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="sd15")
    ap.add_argument("--latent", type=int, default=32, help="latent side (image side = 8x for SD VAEs)")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per path (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=1, help="pairs per step")
    ap.add_argument("--paths", default="naive,lora", help="comma list of naive, lora, full+precomp")
    ap.add_argument("--gc", action="store_true", help="gradient checkpointing on the mmalign paths")
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet on the mmalign paths")
    ap.add_argument("--no-cache", action="store_true", help="mmalign paths encode images and text every step")
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.path:
        return child(args)
    results = {}
    for path in args.paths.split(","):
        cmd = [sys.executable, __file__, "--path", path, "--size", args.size, "--latent", str(args.latent),
               "--steps", str(args.steps), "--batch", str(args.batch)] + (["--gc"] if args.gc else []) + \
              (["--compile"] if args.compile else []) + (["--no-cache"] if args.no_cache else [])
        print(f"running {path} ...", flush=True)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
        line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            results[path] = {"error": (p.stderr or p.stdout)[-800:]}
            print(f"  {path} failed:\n{results[path]['error']}", flush=True)
            continue
        results[path] = json.loads(line[0][7:])
        results[path]["wall_s"] = time.perf_counter() - t0
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    base = results.get("naive", {})
    print(f"\nDiffusion-DPO step, {args.size}-sized UNet, {args.latent}x{args.latent} latents, {args.batch} pair(s)/step, "
          f"{device}{', grad ckpt' if args.gc else ''}{', compile' if args.compile else ''}"
          f"{', no cache' if args.no_cache else ''}")
    from mmalign.utils import print_table

    rows = []
    for k, r in results.items():
        if "error" in r:
            rows.append([k, "failed", "", "", "", ""])
            continue
        sp = f"{base['sec_per_step'] / r['sec_per_step']:.2f}x" if "sec_per_step" in base else "-"
        mem = f"{r['peak_mb'] / base['peak_mb']:.2f}x" if "peak_mb" in base else "-"
        rows.append([k, f"{r['sec_per_step']:.3f}", sp, f"{r['peak_mb']:.0f}", mem, f"{r['trainable'] / 1e6:.1f}M"])
    print_table(["path", "s/step", "speed vs naive", "peak MB", "memory vs naive", "trainable"], rows)
    print("JSON " + json.dumps({"size": args.size, "latent": args.latent, "batch": args.batch, "device": device,
                                "gc": args.gc, "compile": args.compile, "cache": not args.no_cache,
                                "results": results}))


if __name__ == "__main__":
    main()
