"""GPU plan without a GPU: parameters, FLOPs per training step and an *estimated* peak GPU memory for
Diffusion-DPO LoRA on SD1.5 / SDXL / SD3.5-medium / FLUX.1-dev, at 512 and 1024 px, with and without gradient
checkpointing -- from the published model configs, on the meta device (no weights are downloaded).

Method (an estimate, never a measurement):
* parameters: the real diffusers / transformers classes built on ``torch.device("meta")`` from the published
  configs (denoiser, VAE, text encoders); LoRA rank ``--rank`` on to_q / to_k / to_v / to_out.0 (peft).
* FLOPs: ``torch.utils.flop_counter`` on a fake-tensor forward of the denoiser for one pair (2 images, winner
  and loser); attention counted as 4 B H L S D. A LoRA step = policy forward + backward (input gradients only
  through frozen weights: ~1x forward) + the reference forward (adapters off) = ~3x forward FLOPs.
* memory: frozen weights in bf16 (denoiser -- or fp8 with ``--storage fp8``, ``model.storage_dtype``; VAE and
  text encoders too unless ``--cache``, the latent + text
  cache mmalign's LoRA configs use) + LoRA weights, gradients and AdamW states in fp32 + the tensors saved for
  backward in bf16, counted with ``saved_tensors_hooks`` during the fake forward (deduplicated by storage;
  attention saves q, k, v, out and the log-sum-exp, as flash / memory-efficient SDPA kernels do). With
  gradient checkpointing: every checkpointed block keeps only its inputs, plus one block's activations while
  it is recomputed. Plus 10% for the allocator and workspaces. The reference forward runs under no_grad and
  adds only transient activations.

``auto on N GB`` (``--cards``, 24 and 80 by default): what ``model.gradient_checkpointing: auto`` would choose on
such a card -- its own rule (``mmalign.models.checkpointing``) applied to these estimates, with the card less the
frozen and LoRA weights as the free memory at the first trained forward.

Online methods (``--methods grpo nft awm online_dpo``): the VAE and the text encoders stay on the GPU (rollouts
encode prompts and decode images) and so does the trained reward model (``--reward-params``, PickScore's CLIP
ViT-H/14: 0.99B, bf16). What one trained unit costs, with F = the denoiser's forward FLOPs for one image:
  dpo / online_dpo  a pair, 2 images with gradient:             policy fwd + bwd + reference fwd  = 3 x 2F
  grpo              a trained SDE step, [uncond; cond] (CFG):    the same                          = 3 x 2F
  nft / awm         a final latent at one t, 1 image (no CFG):   policy fwd + bwd + old + ref fwd  = 4 x F
plus the rollout: T sampler steps x 2F per image with CFG (x F without). Rollout activations are transient
(no_grad) and not counted.

    python scripts/plan_memory.py [--models sd15 sdxl sd35 flux --resolutions 512 1024 --rank 8]
    python scripts/plan_memory.py --models sd35 flux --methods grpo nft --rank 32
    python scripts/plan_memory.py --models flux --resolutions 1024 --storage fp8   # FLUX.1-dev on a 24 GB card?
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

GB = 1024 ** 3

UNET_SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
UNET_SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280), use_linear_projection=True,
                 transformer_layers_per_block=(1, 2, 10), addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
SD35M = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
             pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, vocab_size=49408,
              projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, vocab_size=49408,
              projection_dim=1280)
T5_XXL = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128,
              feed_forward_proj="gated-gelu")
VAE4 = dict(block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
VAE16 = dict(VAE4, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)

MODELS = {  # denoiser kind, config, text encoders, VAE, text tokens
    "sd15": ("unet", UNET_SD15, [("clip", CLIP_L)], VAE4, 77),
    "sdxl": ("unet", UNET_SDXL, [("clip", CLIP_L), ("clip", CLIP_G)], VAE4, 77),
    "sd35": ("sd3", SD35M, [("clip", CLIP_L), ("clip", CLIP_G), ("t5", T5_XXL)], VAE16, 333),
    "flux": ("flux", FLUX_DEV, [("clip", CLIP_L), ("t5", T5_XXL)], VAE16, 512),
}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build(name: str, rank: int):
    import diffusers
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from mmalign.diffusion.storage import frozen_convs_save_no_input  # what a LoRA run applies, not a copy

    kind, cfg, texts, vae_cfg, _ = MODELS[name]
    with torch.device("meta"):
        den = {"unet": diffusers.UNet2DConditionModel, "sd3": diffusers.SD3Transformer2DModel,
               "flux": diffusers.FluxTransformer2DModel}[kind](**cfg)
        frozen_other = count(diffusers.AutoencoderKL(**vae_cfg))
        text_params = sum(count(CLIPTextModel(CLIPTextConfig(**c)) if k == "clip" else T5EncoderModel(T5Config(**c)))
                          for k, c in texts)
        base = count(den)
        den.requires_grad_(False)
        den.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights="gaussian"))
        frozen_convs_save_no_input(den)  # as the diffusion recipe's LoRA runs: frozen convs keep no input
    lora = sum(p.numel() for p in den.parameters() if p.requires_grad)
    return den, base, lora, frozen_other, text_params


class _Flash(torch.autograd.Function):
    """SDPA with the memory profile of flash / memory-efficient kernels: saves q, k, v, out and the LSE."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, g):  # pragma: no cover - the plan never runs backward
        q, k, v, *_ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def profile(name: str, resolution: int, rank: int) -> dict:
    den, base, lora, vae, text = build(name, rank)
    kind, cfg, texts, _, tokens = MODELS[name]
    lat = resolution // 8
    attn_flops = [0]

    def sdpa(*args, **kw):  # diffusers' attention dispatch passes query= / key= / value= by keyword
        q, k, v = (list(args) + [kw.pop(n) for n in ("query", "key", "value")[len(args):]])[:3]
        b, h, lq, d = q.shape
        attn_flops[0] += 4 * b * h * lq * k.shape[-2] * d
        return _Flash.apply(q, k, v)

    saved, seen = [0], set()

    def pack(x):
        key = (id(x.untyped_storage()) if hasattr(x, "untyped_storage") else id(x))
        if key not in seen and not isinstance(x, torch.nn.Parameter):
            seen.add(key)
            saved[0] += x.numel() * 2  # bf16 under autocast
        return x

    block_stats = []  # (input bytes, saved bytes) per checkpointable block
    blocks = [m for m in den.modules() if type(m).__name__ in (
        "BasicTransformerBlock", "ResnetBlock2D", "JointTransformerBlock", "FluxTransformerBlock",
        "FluxSingleTransformerBlock", "Transformer2DModel")]
    hooks = []
    for m in blocks:
        def pre(mod, args, kwargs, _m=m):
            x = args[0] if args else next(iter(kwargs.values()))
            _m._plan_start = saved[0]
            _m._plan_in = x.numel() * 2 if torch.is_tensor(x) else 0

        def post(mod, args, kwargs, out, _m=m):
            block_stats.append((_m._plan_in, saved[0] - _m._plan_start, type(_m).__name__))
        hooks += [m.register_forward_pre_hook(pre, with_kwargs=True), m.register_forward_hook(post, with_kwargs=True)]
    real_sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = sdpa
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            b = 2  # one pair
            if kind == "unet":
                x = torch.randn(b, 4, lat, lat, device="meta")
                kw = {"encoder_hidden_states": torch.randn(b, tokens, cfg["cross_attention_dim"], device="meta")}
                if name == "sdxl":
                    kw["added_cond_kwargs"] = {"text_embeds": torch.randn(b, 1280, device="meta"),
                                               "time_ids": torch.randn(b, 6, device="meta")}
                args = (x, torch.ones(b, device="meta"))
            elif kind == "sd3":
                args = ()
                kw = {"hidden_states": torch.randn(b, 16, lat, lat, device="meta"),
                      "encoder_hidden_states": torch.randn(b, tokens, 4096, device="meta"),
                      "pooled_projections": torch.randn(b, 2048, device="meta"), "timestep": torch.ones(b, device="meta")}
            else:
                n = (lat // 2) ** 2
                args = ()
                kw = {"hidden_states": torch.randn(b, n, 64, device="meta"),
                      "encoder_hidden_states": torch.randn(b, tokens, 4096, device="meta"),
                      "pooled_projections": torch.randn(b, 768, device="meta"), "timestep": torch.ones(b, device="meta"),
                      "guidance": torch.ones(b, device="meta"), "txt_ids": torch.zeros(tokens, 3, device="meta"),
                      "img_ids": torch.zeros(n, 3, device="meta")}
            with FlopCounterMode(display=False) as fc, torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                den(*args, **kw)
            fwd = fc.get_total_flops() + attn_flops[0]
    finally:
        F.scaled_dot_product_attention = real_sdpa
        for h in hooks:
            h.remove()
    outer = [s for s in block_stats if s[2] != "Transformer2DModel"]  # SD's Transformer2DModel wraps blocks
    ckpt_saved = sum(i for i, _, _ in outer) + max((s for _, s, _ in outer), default=0) + \
        max(0, saved[0] - sum(s for _, s, _ in outer))
    return {"model": name, "resolution": resolution, "denoiser_params": base, "lora_params": lora,
            "vae_params": vae, "text_params": text, "fwd_tflops_pair": fwd / 1e12, "step_tflops_pair": 3 * fwd / 1e12,
            "activations_gb": saved[0] / GB, "activations_ckpt_gb": ckpt_saved / GB}


# images with gradient per trained unit, and the unit's FLOPs in forwards of one image (see the module docstring)
METHODS = {"dpo": (2, 6), "online_dpo": (2, 6), "grpo": (2, 6), "nft": (1, 4), "awm": (1, 4)}
UNGUIDED = ("flux",)  # FLUX.1-dev is guidance-distilled: no [uncond; cond] pair in its rollouts or GRPO's steps


def unit(method: str, model: str) -> tuple[int, int]:
    """(images with gradient, forwards of one image) of one trained unit of ``method`` on ``model``."""
    images, forwards = METHODS[method]
    if method == "grpo" and model in UNGUIDED:
        return 1, 3
    return images, forwards


STORAGE_BYTES = {"bf16": 2, "fp8": 1}


def frozen_bytes(p: dict, cache: bool, method: str = "dpo", reward_params: float = 0.0, storage: str = "bf16") -> float:
    """``storage``: bytes per frozen denoiser weight (``model.storage_dtype``: fp8 = float8_e4m3fn, upcast per
    layer to bf16; the one layer's upcast copy at a time is not counted, nor the norms kept in bf16)."""
    online = method != "dpo"
    return STORAGE_BYTES[storage] * p["denoiser_params"] + 2 * (
        (0 if cache and not online else p["vae_params"] + p["text_params"]) + (reward_params if online else 0))


def activation_bytes(p: dict, ckpt: bool, method: str = "dpo") -> float:
    images, _ = unit(method, p["model"])
    return (p["activations_ckpt_gb"] if ckpt else p["activations_gb"]) * GB * images / 2  # profiled for 2 images


def estimate(p: dict, cache: bool, ckpt: bool, method: str = "dpo", reward_params: float = 0.0,
             storage: str = "bf16") -> float:
    trainable = 16 * p["lora_params"]  # fp32 weights + grads + two AdamW states
    return 1.1 * (frozen_bytes(p, cache, method, reward_params, storage) + trainable +
                  activation_bytes(p, ckpt, method)) / GB


def auto_choice(p: dict, card_gb: float, cache: bool, method: str = "dpo", reward_params: float = 0.0,
                storage: str = "bf16") -> str:
    """What ``model.gradient_checkpointing: auto`` would choose on a card of ``card_gb``: its rule
    (``mmalign.models.checkpointing``) with these estimates -- free memory at the first trained forward = the card
    less the frozen and LoRA weights."""
    from mmalign.models.checkpointing import checkpointing_needed  # the rule a run applies, not a copy of it

    free = card_gb * GB - frozen_bytes(p, cache, method, reward_params, storage) - 4 * p["lora_params"]
    if free <= 0:
        return "-"
    return "on" if checkpointing_needed(activation_bytes(p, False, method), 4 * p["lora_params"], free) else "off"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--no-cache", action="store_true", help="VAE and text encoders stay on the GPU (no latent cache)")
    ap.add_argument("--storage", choices=sorted(STORAGE_BYTES), default="bf16",
                    help="frozen denoiser weights: bf16, or fp8 stored and upcast per layer (model.storage_dtype)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--methods", nargs="+", default=["dpo"], choices=sorted(METHODS))
    ap.add_argument("--reward-params", type=float, default=0.99e9, help="online methods: the trained reward model's "
                                                                         "parameters (PickScore: 0.99B)")
    ap.add_argument("--sample-steps", type=int, default=10, help="online methods: sampler steps per rollout image")
    ap.add_argument("--cards", type=float, nargs="+", default=[24, 80], help="GPU memory (GB) for the columns "
                    "'auto on N GB': what model.gradient_checkpointing=auto would choose there")
    args = ap.parse_args()
    from mmalign.utils import print_table

    rows, out = [], []
    for m in args.models:
        for r in args.resolutions:
            p = profile(m, r, args.rank)
            f_img = p["fwd_tflops_pair"] / 2
            for method in args.methods:
                a = estimate(p, not args.no_cache, False, method, args.reward_params, args.storage)
                b = estimate(p, not args.no_cache, True, method, args.reward_params, args.storage)
                cost = unit(method, m)[1] * f_img
                cfg_mult = 1 if method in ("nft", "awm") or m in UNGUIDED else 2
                roll = args.sample_steps * cfg_mult * f_img if method != "dpo" else 0.0
                auto = [auto_choice(p, c, not args.no_cache, method, args.reward_params, args.storage)
                        for c in args.cards]
                out.append({**p, "method": method, "peak_gb": a, "peak_ckpt_gb": b, "unit_tflops": cost,
                            "rollout_tflops_per_image": roll, "storage": args.storage,
                            "auto_checkpointing": dict(zip((f"{c:g}" for c in args.cards), auto))})
                rows.append([m, r, method, f"{p['denoiser_params'] / 1e9:.2f}B", f"{p['lora_params'] / 1e6:.1f}M",
                             f"{(p['vae_params'] + p['text_params']) / 1e9:.2f}B", f"{cost:.1f}",
                             f"{roll:.1f}" if roll else "-", f"{a:.1f}", f"{b:.1f}", *auto])
    print(f"ESTIMATES (no GPU used): LoRA r={args.rank}, one trained unit per GPU (a pair for DPO, a guided step for "
          f"GRPO, an image for NFT / AWM), frozen denoiser weights stored in {args.storage}"
          f"{' (upcast per layer to bf16)' if args.storage == 'fp8' else ''}, other frozen weights bf16; offline DPO "
          f"{'with VAE + text encoders on the GPU' if args.no_cache else 'on the latent + text cache'}, online methods "
          f"with VAE, text encoders and a {args.reward_params / 1e9:.2f}B reward on the GPU; rollouts of "
          f"{args.sample_steps} steps")
    print_table(["model", "px", "method", "denoiser", "LoRA", "VAE+text", "TFLOP/unit", "rollout TFLOP/img",
                 "peak GB", "peak GB (grad ckpt)", *[f"auto on {c:g} GB" for c in args.cards]], rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
