"""Frozen-weight storage on the big transformers: SD3.5-medium and FLUX.1-dev at their real configs (random
weights), LoRA Diffusion-DPO step at 1024 px, frozen weights stored in bf16 then in fp8 (``model.storage_dtype``,
``mmalign.diffusion.storage``) -- the measurement behind ``scripts/plan_memory.py --storage fp8``'s estimate.

For each model: the transformer is built once in bf16 on the device (configs from ``scripts/plan_memory.py``),
LoRA rank ``--rank`` on to_q / to_k / to_v / to_out.0 (fp32), gradient checkpointing on; one DPO step (policy
forward + backward, reference forward with the adapters disabled) on random latents and text embeddings of the
real shapes, under bf16 autocast. Measured per storage: the bytes of the stored weights (parameters and buffers:
fp8 values, their scales, the LoRA matrices; and CUDA's allocated memory), the step's peak (CUDA max allocated; on
CPU the RSS high-water mark, which counts the whole process), its time, and how far fp8 moves the policy's
prediction from bf16's on the same weights and inputs (relative L2: the quantisation error).
Prints a table and one JSON line.

    python scripts/bench_storage.py                          # GPU: SD3.5-M and FLUX.1-dev, 1024 px (~2 min, H100)
    python scripts/bench_storage.py --models flux --resolution 512
    python scripts/bench_storage.py --tiny                   # the same code on toy configs (CPU, seconds)
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

TINY = {"sd35": dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
                     num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24,
                     pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm"),
        "flux": dict(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8,
                     num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, guidance_embeds=True,
                     axes_dims_rope=(2, 2, 4))}
TEXT_TOKENS = {"sd35": 333, "flux": 512}


def build(name: str, tiny: bool, device, rank: int):
    import diffusers
    from peft import LoraConfig

    from plan_memory import FLUX_DEV, SD35M

    cfg = TINY[name] if tiny else {"sd35": SD35M, "flux": FLUX_DEV}[name]
    cls = diffusers.SD3Transformer2DModel if name == "sd35" else diffusers.FluxTransformer2DModel
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # 12B parameters: never materialised in fp32
    try:
        with torch.device(device):
            model = cls(**cfg)
    finally:
        torch.set_default_dtype(prev)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                 init_lora_weights="gaussian"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    model.enable_gradient_checkpointing()
    return model, cfg


def inputs(name: str, cfg: dict, resolution: int, tiny: bool, device):
    """Random latents of the real shape (16 channels, resolution / 8) for a pair, text embeddings, sigma."""
    from mmalign.diffusion.families import latent_image_ids, pack_latents

    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    x0, noise = (torch.randn(2, 16, side, side, generator=g) for _ in range(2))
    sigma = torch.full((2,), 0.6)
    text = 8 if tiny else TEXT_TOKENS[name]
    emb = torch.randn(2, text, cfg["joint_attention_dim"], generator=g)
    pooled = torch.randn(2, cfg["pooled_projection_dim"], generator=g)
    xt = (1 - 0.6) * x0 + 0.6 * noise
    kw = dict(encoder_hidden_states=emb, pooled_projections=pooled)
    if name == "sd35":
        kw.update(hidden_states=xt, timestep=sigma * 1000)
    else:
        kw.update(hidden_states=pack_latents(xt), timestep=sigma, guidance=torch.full((2,), 3.5),
                  txt_ids=torch.zeros(text, 3), img_ids=latent_image_ids(side, side, "cpu", torch.float32))
    kw = {k: v.to(device) for k, v in kw.items()}
    target = (noise - x0).to(device)
    if name == "flux":
        target = pack_latents(target)
    return kw, target


def dpo_step(model, kw, target, beta: float = 5000.0) -> tuple[float, torch.Tensor]:
    """One LoRA DPO step's work: policy forward + backward, reference forward with the adapters off. Returns the
    loss and the policy's prediction (detached, on the CPU)."""
    dev = target.device.type
    with torch.autocast(dev, dtype=torch.bfloat16):
        pred = model(**kw).sample
        mse = (pred.float() - target).pow(2).flatten(1).mean(1)
        with torch.no_grad():
            model.disable_adapters()
            ref = (model(**kw).sample.float() - target).pow(2).flatten(1).mean(1)
            model.enable_adapters()
    loss = -F.logsigmoid(-0.5 * beta * ((mse[0] - mse[1]) - (ref[0] - ref[1])))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss.item(), pred.detach().float().cpu()


def stored_gb(model) -> float:
    """Bytes of every parameter and buffer (the stored weights, their fp8 scales, the LoRA matrices), in GiB."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]) / 2 ** 30


def peak(device) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def measure(name: str, args, device) -> list[dict]:
    from mmalign.diffusion.storage import STORAGE_DTYPES, store_frozen

    model, cfg = build(name, args.tiny, device, args.rank)
    kw, target = inputs(name, cfg, args.resolution, args.tiny, device)
    rows = []
    for storage in ("bfloat16", "float8_e4m3fn"):
        if storage != "bfloat16":
            store_frozen(model, STORAGE_DTYPES[storage], torch.bfloat16)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated() / 2 ** 30 if device == "cuda" else None
        t0 = time.perf_counter()
        loss, pred = dpo_step(model, kw, target)
        if device == "cuda":
            torch.cuda.synchronize()
        rows.append({"model": name, "storage": storage, "resolution": args.resolution,
                     "params_b": sum(p.numel() for p in model.parameters()) / 1e9, "weights_gb": stored_gb(model),
                     "allocated_gb": allocated, "step_peak_gb": peak(device), "step_s": time.perf_counter() - t0,
                     "loss": loss, "pred": pred})
    a, b = rows[0].pop("pred"), rows[1].pop("pred")
    rows[1]["pred_rel_err_vs_bf16"] = float((b - a).norm() / a.norm())  # what fp8 storage changes in the output
    del model
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["sd35", "flux"], choices=["sd35", "flux"])
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="toy configs instead of the real ones (CPU smoke test)")
    args = ap.parse_args()
    if args.tiny:
        args.resolution = min(args.resolution, 64)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from mmalign.utils import print_table

    rows = [r for m in args.models for r in measure(m, args, device)]
    unit = "GiB allocated" if device == "cuda" else "GiB peak RSS, whole process"
    print(f"LoRA DPO step, frozen transformer stored as shown, bf16 compute, gradient checkpointing, "
          f"{args.resolution} px, {'toy' if args.tiny else 'real'} configs, random weights, "
          f"{torch.cuda.get_device_name(0) if device == 'cuda' else 'CPU'} ({unit})")
    print_table(["model", "storage", "params", "weights GiB", "step peak", "step s", "prediction vs bf16"],
                [[r["model"], r["storage"], f"{r['params_b']:.2f}B", f"{r['weights_gb']:.2f}", f"{r['step_peak_gb']:.2f}",
                  f"{r['step_s']:.2f}", f"{r['pred_rel_err_vs_bf16']:.1e}" if "pred_rel_err_vs_bf16" in r else "-"]
                 for r in rows])
    out = {"device": device, "tiny": args.tiny, "resolution": args.resolution, "rows": rows}
    for m in args.models:
        pair = [r for r in rows if r["model"] == m]
        out[f"{m}_fp8_weights_vs_bf16"] = round(pair[1]["weights_gb"] / pair[0]["weights_gb"], 3)
        out[f"{m}_fp8_step_peak_gb"] = round(pair[1]["step_peak_gb"], 2)
    print("JSON " + json.dumps(out))


if __name__ == "__main__":
    main()
