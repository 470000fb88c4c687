"""Pretrain the demo's tiny text-to-image model and write it to assets/models/shapes-sd (a diffusers
StableDiffusionPipeline folder: unet/, vae/, text_encoder/, tokenizer/, scheduler/), or with
``--family sd3`` a flow-matching model to assets/models/shapes-sd3 (a StableDiffusion3Pipeline folder:
SD3Transformer2DModel, two CLIP text encoders with projections and no T5 -- the pipeline zero-fills the T5
stream as SD3 does when text_encoder_3 is dropped; the VAE is taken from shapes-sd with ``--vae-from``).

Real classes at toy size: AutoencoderKL (32x32 RGB -> 8x8x4 latents), CLIPTextModel, and
UNet2DConditionModel with cross-attention, trained from scratch on the procedural shapes world.
Captions are deliberately noisy (the colour word is wrong for --color-noise of the images, the shape
word for --shape-noise), so the base model follows prompts only imperfectly: there is something for
preference alignment to fix. Deterministic given the seed and device; about 45 minutes on 2 CPU cores
(--device cpu), a few minutes on a GPU.

    python scripts/pretrain_demo_model.py [--out assets/models/shapes-sd]
    python scripts/pretrain_demo_model.py --family sd3 --vae-from assets/models/shapes-sd \
        --out assets/models/shapes-sd3
"""
import argparse
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmalign.toyworld.world import COLORS, SHAPES, IMAGE_SIZE, all_prompts, describe, is_correct, oracle_score, render, sample_scene
from mmalign.diffusion.models import TINY_CLIP_TOKENIZER, Components, save_components

DEVICE = torch.device("cpu")


def build(seed=0):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(TINY_CLIP_TOKENIZER))
    te = CLIPTextModel(CLIPTextConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tok),
        max_position_embeddings=tok.model_max_length, hidden_act="gelu", projection_dim=64))
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 64, 64), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        latent_channels=4, norm_num_groups=32, sample_size=IMAGE_SIZE)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(48, 96), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64, attention_head_dim=16,
        norm_num_groups=16)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                          prediction_type="epsilon", steps_offset=1, clip_sample=False)
    return Components("sd", unet, vae, te, tok, sched)


def build_sd3(seed, vae_from):
    """SD3 layout at toy size: MMDiT on the 8x8x4 latents (patch 1: 64 image tokens), two CLIP encoders
    (hidden 64 each, concatenated to 128 = joint_attention_dim), pooled projections 64 + 64."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(TINY_CLIP_TOKENIZER))
    te_cfg = lambda: CLIPTextConfig(  # noqa: E731
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tok),
        max_position_embeddings=tok.model_max_length, hidden_act="gelu", projection_dim=64)
    te, te2 = CLIPTextModelWithProjection(te_cfg()), CLIPTextModelWithProjection(te_cfg())
    vae = AutoencoderKL.from_pretrained(vae_from, subfolder="vae").float()
    vae.register_to_config(shift_factor=0.0)  # the SD3 pipeline decodes z / scaling_factor + shift_factor
    tr = SD3Transformer2DModel(sample_size=IMAGE_SIZE // 4, patch_size=1, in_channels=4, out_channels=4, num_layers=6,
                               attention_head_dim=16, num_attention_heads=4, caption_projection_dim=64,
                               joint_attention_dim=128, pooled_projection_dim=128, pos_embed_max_size=IMAGE_SIZE // 4)
    # shift 1: SD3's shift 3 is for 1024 px (4096 latent tokens); these 64-token latents need none
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return Components("sd3", tr, vae, te, tok, sched, te2, tok)


def batch_images(rng, n):
    scenes = [sample_scene(rng) for _ in range(n)]
    x = torch.stack([torch.from_numpy(np.asarray(render(s), np.float32)).permute(2, 0, 1) for s in scenes])
    return x / 127.5 - 1.0, scenes


def noisy_caption(rng, scene, color_noise, shape_noise, drop):
    if rng.random() < drop:
        return ""
    c, s = scene.color, scene.shape
    if rng.random() < color_noise:
        c = rng.choice([x for x in COLORS if x != c])
    if rng.random() < shape_noise:
        s = rng.choice([x for x in SHAPES if x != s])
    return describe(c, s)


def train_vae(vae, steps, rng, log):
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    for step in range(steps):
        x, _ = batch_images(rng, 48)
        x = x.to(DEVICE)
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        kl = post.kl().mean()
        loss = F.mse_loss(rec, x) + 1e-6 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 200 == 0 or step == steps - 1:
            log(f"vae step {step}: mse {F.mse_loss(rec, x).item():.5f} kl {kl.item():.1f}")
    with torch.no_grad():
        x, _ = batch_images(rng, 512)
        z = vae.encode(x.to(DEVICE)).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    log(f"vae scaling_factor {vae.config.scaling_factor:.4f}")


@torch.no_grad()
def latent_pool(vae, rng, n, log):
    """Render and encode ``n`` scenes once; training samples minibatches (captions re-noised each time)."""
    lats, scenes = [], []
    for lo in range(0, n, 256):
        x, sc = batch_images(rng, min(256, n - lo))
        lats.append(vae.encode(x.to(DEVICE)).latent_dist.mean * vae.config.scaling_factor)
        scenes += sc
    log(f"encoded a pool of {n} scenes")
    return torch.cat(lats), scenes


def train_unet(comp, steps, rng, args, log):
    unet, te, vae, sched, tok = comp.unet, comp.text_encoder, comp.vae, comp.noise_scheduler, comp.tokenizer
    vae.requires_grad_(False)
    pool, pool_scenes = latent_pool(vae, rng, args.pool, log)
    encoders = [m for m in (te, comp.text_encoder_2) if m is not None]
    params = list(unet.parameters()) + [p for m in encoders for p in m.parameters()]
    tgen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200) * (0.5 * (1 + np.cos(np.pi * s / steps))))
    t0 = time.time()
    for step in range(steps):
        idx = [rng.randrange(len(pool)) for _ in range(args.batch)]
        lat = pool[torch.tensor(idx, device=pool.device)]
        caps = [noisy_caption(rng, pool_scenes[i], args.color_noise, args.shape_noise, 0.1) for i in idx]
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(DEVICE)
        noise = torch.randn_like(lat)
        if comp.kind == "sd3":
            # the SD3 pipeline's conditioning: penultimate CLIP hidden states of both encoders concatenated
            # (zero-padded to joint_attention_dim), pooled = both projections concatenated; rectified flow with
            # logit-normal sigma (SD3 paper, Esser et al. 2024, Sec. 3.1): x_t = (1-s) x0 + s n, target n - x0
            outs = [m(ids, output_hidden_states=True) for m in encoders]
            emb = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
            emb = F.pad(emb, (0, unet.config.joint_attention_dim - emb.shape[-1]))
            emb = torch.cat([emb, torch.zeros_like(emb)], dim=1)  # the zero T5 stream (no text_encoder_3)
            pooled = torch.cat([o.text_embeds for o in outs], dim=-1)
            sigma = torch.sigmoid(torch.randn(lat.shape[0], generator=tgen)).view(-1, 1, 1, 1).to(DEVICE)
            pred = unet(hidden_states=(1 - sigma) * lat + sigma * noise, timestep=sigma.flatten() * 1000,
                        encoder_hidden_states=emb, pooled_projections=pooled).sample
            loss = F.mse_loss(pred, noise - lat)
        else:
            emb = te(ids)[0]
            t = torch.randint(0, sched.config.num_train_timesteps, (lat.shape[0],)).to(DEVICE)
            pred = unet(sched.add_noise(lat, noise, t), t, encoder_hidden_states=emb).sample
            loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"unet step {step}: loss {loss.item():.4f} ({time.time() - t0:.0f}s)")


@torch.no_grad()
def evaluate(comp, n_per_prompt=8, seed=123):
    pipe = comp.pipeline().to(DEVICE)
    prompts = all_prompts()
    all_p = [p for p in prompts for _ in range(n_per_prompt)]
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(all_p))]
    ims = pipe(all_p, num_inference_steps=20, guidance_scale=3.0, height=IMAGE_SIZE, width=IMAGE_SIZE,
               generator=gens).images
    sc = [oracle_score(i, p) for i, p in zip(ims, all_p)]
    ok = [is_correct(i, p) for i, p in zip(ims, all_p)]
    return float(np.mean(sc)), float(np.mean(ok)), ims, all_p


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="assets/models/shapes-sd")
    ap.add_argument("--vae-steps", type=int, default=800)
    ap.add_argument("--unet-steps", type=int, default=4000)
    ap.add_argument("--pool", type=int, default=30000)
    ap.add_argument("--batch", type=int, default=96)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--color-noise", type=float, default=0.4)
    ap.add_argument("--shape-noise", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--family", choices=("sd", "sd3"), default="sd",
                    help="sd: UNet + DDPM (the demo's model); sd3: flow-matching MMDiT")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--vae-from", default=None, help="sd3: reuse this pipeline folder's VAE (no VAE training)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cpu":
        torch.set_num_threads(2)
    rng = random.Random(args.seed)
    out = Path(args.out)
    logf = open(out.parent / f"{out.name}.pretrain.log", "w") if out.parent.exists() else None

    def log(msg):
        print(msg, flush=True)
        if logf:
            logf.write(msg + "\n")
            logf.flush()

    if args.family == "sd3":
        if not args.vae_from:
            ap.error("--family sd3 needs --vae-from (e.g. assets/models/shapes-sd)")
        comp = build_sd3(args.seed, args.vae_from)
    else:
        comp = build(args.seed)
    n = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    log(f"params: {args.family} denoiser {n(comp.unet):.2f}M, vae {n(comp.vae):.2f}M, text "
        f"{sum(n(m) for m in (comp.text_encoder, comp.text_encoder_2) if m is not None):.2f}M")
    for m in comp.frozen_modules() + [comp.unet]:
        m.to(DEVICE)
    if not args.vae_from:
        train_vae(comp.vae, args.vae_steps, rng, log)
    train_unet(comp, args.unet_steps, rng, args, log)
    for m in comp.frozen_modules() + [comp.unet]:
        m.eval()
    score, acc, ims, prompts = evaluate(comp)
    log(f"base model: oracle score {score:.3f}, prompt accuracy {acc:.3f}")
    # ship fp16 weights to keep the assets small; the demo loads them back as fp32
    for m in comp.frozen_modules() + [comp.unet]:
        m.half().cpu()
    save_components(comp, out)
    (out / "TRAINING.md").write_text(
        f"Pretrained by scripts/pretrain_demo_model.py {vars(args)}\n\nBase model on all 18 prompts x 8 seeds: "
        f"oracle score {score:.3f}, prompt accuracy {acc:.3f}.\n")
    log(f"saved to {out}")


if __name__ == "__main__":
    main()
