"""Diffusion-DPO LoRA step time and peak memory: mmalign vs the way people run it today, same run.

Paths (each repeat of each path is its own subprocess, so its peak memory -- CUDA max allocated, or peak RSS on
CPU -- is its own; repeats are interleaved: peer, peer_kept_heap, salesforce, mmalign_first_pass, mmalign,
mmalign_sweep, mmalign_precomputed, peer, ...; salesforce, the slowest by far, runs once with 1 timed step;
mmalign_precomputed once):

  peer         the diffusers LoRA script's step (examples/research_projects/diffusion_dpo/train_diffusion_dpo.py
               with its README's flags): peft LoRA on to_q/k/v/out (rank 8, alpha = rank, gaussian init),
               gradient checkpointing, every step decodes the pair's JPEGs (dataloader workers 0, its default),
               vae.encode(...).latent_dist.sample() of winner and loser, text encoding, one forward of the
               concatenated pair, a second forward with adapters disabled as the reference, clip grad norm 1,
               AdamW (its --use_8bit_adam is CUDA-only); frozen weights in the training dtype.
  peer_kept_heap   (CPU only) the same peer step with glibc's malloc told to keep freed memory for reuse
               (``mmalign.utils.keep_cpu_heap``, which ``mmalign train`` does on CPU): separates what that one
               setting gives from the rest of mmalign's step -- ``speed_ratio_vs_peer_kept_heap``.
  peer_no_ckpt   (not in the default paths: --paths ...,peer_no_ckpt) the peer with its heap kept and without
               ``--gradient_checkpointing``: what a diffusers user who knows the step fits would run, the like-for-like
               comparison for mmalign's ``gradient_checkpointing: auto`` where auto turns it off --
               ``speed_ratio_vs_peer_no_ckpt``, ``first_pass_ratio_vs_peer_no_ckpt``.
  salesforce   the original Salesforce train.py way: full UNet fine-tune, a frozen fp32 copy as the reference,
               VAE + text encoding every step, same data decoding.
  mmalign_first_pass   ``configs/sd15/diffusion_dpo_lora.yaml`` (``configs/sdxl/...`` for --size sdxl) as
               shipped (rank 8, gradient checkpointing auto -- off where the step fits, decided at the first step
               and recorded as ``checkpointing`` -- reference = adapters disabled), through the real recipe
               and training loop, loading the same pipeline folder itself, on data nobody has cached (a fresh
               ``data.cache_dir`` every run): the run reads each pair once, so ``data.cache_build=auto`` fills
               the cache while training -- each step encodes the orientation it draws, as the peer does, and
               keeps it. Only device-bound keys are changed on CPU (fp32, AdamW instead of 8-bit Adam). The
               config's ``model.storage_dtype: auto`` then stores the frozen base in bf16 and computes in fp32
               (the peer's frozen weights are fp32 there; under bf16 both are bf16 and auto stores nothing):
               ``--overrides model.storage_dtype=null`` measures the exact fp32 base.
  mmalign      the same config in its steady state: on a complete latent + text cache (what ``auto`` builds
               before training for a run that reads its data more than once; the first repeat builds it,
               ``data.cache_build=before_training``, its time reported as ``cache_build_s``); later repeats reuse
               it, as every later epoch and every later run on the same data does -- and, the cache being
               complete, never load the VAE or the text encoders. As a later *epoch*, whose noise draws no
               earlier step made, it runs with ``model.reference_record=false`` (else a repeat would read the
               reference scores of the one before: that is the next path).
  mmalign_sweep   a later run of a sweep: the same config, data and seed with another beta (2500), after a first
               run (untimed, once) that recorded its reference scores in the cache folder
               (``model.reference_record``, on as shipped): every step meets draws the first run made, so the
               reference forward leaves the step -- noise still drawn fresh per (step, pair), unlike
               ``mmalign_precomputed``'s fixed draws.
  mmalign_precomputed   the same plus ``model.reference=precomputed, data.noise_draws=1``: reference scores
               are computed once per pair before training (and kept in the cache folder for later runs),
               so the reference forward leaves the step. It reuses the mmalign path's latent + text cache.

Printed: a table, then one JSON line with speed_ratio_vs_peer, memory_ratio_vs_peer, speed_ratio_vs_salesforce
(mmalign in its steady state), the same for mmalign_sweep and mmalign_precomputed (``_sweep``, ``_precomputed``), ``first_pass_ratio_vs_peer`` (the peer's step
time over mmalign_first_pass's, with its per-repeat ratios and verdict) and ``first_pass_ratio_vs_peer_built_up_front``
(the steady step *plus* the per-step share of building the whole cache first -- the first run's setup less the
loading time of the later runs: what a single pass cost before ``cache_build``). Peak memory: CUDA max allocated during the steps, or the process's peak RSS on CPU (loading included);
``train_memory_ratio_vs_peer``: the peak from the first step on (CUDA's counter, or RSS's high-water mark reset
after loading, Linux), which leaves out the one-off loading spike. Step times are medians over all timed steps of all repeats (each
run warms up one step first). ``speed_ratio_vs_peer_per_repeat`` pairs each repeat's peer run with ours (the
paths of one repeat run back to back, so they share the machine's state) and ``speed_verdict`` is ``faster`` or
``slower`` only when every repeat agrees, ``within noise`` when the spread crosses 1 -- on a busy machine the
spread, not the median, is the result. On CPU a run of the default paths also counts the dispatched aten ops of one
warmed step, peer vs mmalign, at SDXL's layout (``--ops-layout``; what ``--ops --size sdxl_layout --latent 8`` prints
alone): ``ops_ratio_vs_peer``, and ``ops_ratio_vs_peer_without_optimizer``: the same less the ops inside
``optimizer.step`` (on CPU mmalign's AdamW is fused and the peer's a loop over the tensors; on CUDA both run
torch's foreach kernels, so the model's forward / backward is what a GPU step's host side differs by).

    python scripts/bench_diffusion_dpo.py                                   # sd15 UNet, 16x16 latents, CPU
    python scripts/bench_diffusion_dpo.py --latent 32 --steps 5 --repeats 1
    python scripts/bench_diffusion_dpo.py --size sdxl --latent 128 --batch 4  # GPU, 1024 px
    python scripts/bench_diffusion_dpo.py --profile mmalign                 # torch.profiler top ops of one step
    python scripts/bench_diffusion_dpo.py --ops --size sdxl_layout --latent 8   # dispatched ops per step vs the peer
    python scripts/bench_diffusion_dpo.py --precision bf16   # both sides in bf16 mixed precision, as on a GPU
    python scripts/bench_diffusion_dpo.py --paths peer,mmalign --overrides model.channels_last=true   # a lever
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PATHS = ("peer", "peer_kept_heap", "salesforce", "mmalign_first_pass", "mmalign", "mmalign_sweep",
         "mmalign_precomputed")
# paths run once, not in every repeat (keeps the default run under 8 minutes on 2 cores): the Salesforce full
# fine-tune only places the old way, with 1 timed step (~25 s on CPU); the precomputed variant shares the mmalign
# path's latent + text cache, as a sweep over the same data does
RUN_ONCE = ("salesforce", "mmalign_precomputed")
PEERS = ("peer", "peer_kept_heap", "peer_no_ckpt", "salesforce")

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
# SDXL's layout (blocks, transformer depths 1/2/10, heads, two text encoders of 12 and 32 layers) at 1/8 of its
# widths: the same operations per step at a fraction of the arithmetic -- for counting dispatched ops on CPU
SIZES["sdxl_layout"] = dict(SIZES["sdxl"], block_out_channels=(40, 80, 160), cross_attention_dim=256,
                            norm_num_groups=8, projection_class_embeddings_input_dim=256 * 6 + 160)
TEXT = {  # CLIP text encoders of the real models
    "tiny": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32),
    "sd15": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768),
    "sdxl2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  projection_dim=1280, hidden_act="gelu"),
    "sdxl_layout": dict(hidden_size=96, intermediate_size=384, num_hidden_layers=12, num_attention_heads=12,
                        projection_dim=96),
    "sdxl_layout2": dict(hidden_size=160, intermediate_size=640, num_hidden_layers=32, num_attention_heads=20,
                         projection_dim=160, hidden_act="gelu"),
}
VAE = {"tiny": dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                    up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32),
       "sd15": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=32)}
VAE["sdxl"] = VAE["sd15"]
VAE["sdxl_layout"] = dict(VAE["sd15"], block_out_channels=(16, 32, 64, 64), norm_num_groups=8)
XL = ("sdxl", "sdxl_layout")  # sizes with SDXL's two text encoders and micro-conditioning


def components(size: str, latent: int, model_dir: str | None = None):
    """Components of the real model classes with the real model's configs, random weights. With ``model_dir``
    they are loaded with ``from_pretrained`` from a folder the parent wrote once (random init of an 860M UNet
    costs ~19 s on 2 cores; loading, as every user and the peer script do, ~2 s)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mmalign.diffusion.models import TINY_CLIP_TOKENIZER, Components

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(TINY_CLIP_TOKENIZER))
    tok.model_max_length = 77
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                          clip_sample=False)
    kind = "sdxl" if size in XL else "sd"
    if model_dir and (Path(model_dir) / "unet").exists():
        d = Path(model_dir)
        comp = Components(kind, UNet2DConditionModel.from_pretrained(d / "unet"),
                          AutoencoderKL.from_pretrained(d / "vae"), CLIPTextModel.from_pretrained(d / "text_encoder"),
                          tok, sched)
        if size in XL:
            comp.text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(d / "text_encoder_2")
            comp.tokenizer_2 = tok
        return comp

    def te_cfg(kind):
        return CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **TEXT[kind])

    unet = UNet2DConditionModel(sample_size=latent, **SIZES[size])
    vae = AutoencoderKL(latent_channels=4, **VAE[size])
    te = CLIPTextModel(te_cfg({"sdxl": "sd15"}.get(size, size)))
    comp = Components(kind, unet, vae, te, tok, sched)
    if size in XL:
        comp.text_encoder_2 = CLIPTextModelWithProjection(te_cfg(size + "2"))  # TEXT's sdxl2 / sdxl_layout2
        comp.tokenizer_2 = tok
    if model_dir:  # a diffusers pipeline folder, as users download it
        from mmalign.diffusion.models import save_components

        save_components(comp, model_dir)
    return comp


def image_px(size: str, latent: int) -> int:
    return latent * (2 if size == "tiny" else 8)


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


def reset_train_peak():
    """Start the training-phase peak here (after loading): CUDA's peak counter, or on Linux the process's RSS
    high-water mark (``/proc/self/clear_refs`` 5 resets VmHWM to the current RSS)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def train_peak_mb() -> float:
    """Peak memory since ``reset_train_peak``: what training holds, without the one-off loading spike (a process
    that loads fp32 weights and stores them lower peaks while both exist, and keeps a memory-mapped weight file
    resident while it is read)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        line = [x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM")][0]
        return int(line.split()[1]) / 1024
    except (OSError, IndexError):
        return peak_memory_mb()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------ the peers' steps (child process)


def peer_loader(data: Path, px: int, batch: int, tok):
    """Pick-a-Pic parquet -> (pixel pairs stacked on channels, token ids), decoded in the step as the peer does."""
    import datasets
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize(px, interpolation=transforms.InterpolationMode.BILINEAR),
                             transforms.CenterCrop(px), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize([0.5], [0.5])])

    def prep(ex):
        cols = [[tf(Image.open(io.BytesIO(b)).convert("RGB")) for b in ex[c]] for c in ("jpg_0", "jpg_1")]
        pv = []
        for pair, label_0 in zip(zip(*cols), ex["label_0"]):
            pv.append(torch.cat(pair[::-1] if label_0 == 0 else pair, dim=0))
        ex["pixel_values"] = pv
        ex["input_ids"] = list(tok(ex["caption"], max_length=tok.model_max_length, padding="max_length",
                                   truncation=True, return_tensors="pt").input_ids)
        return ex

    ds = datasets.Dataset.from_parquet(str(data)).with_transform(prep)

    def collate(exs):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in exs]).float(),
                "input_ids": torch.stack([e["input_ids"] for e in exs])}

    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, collate_fn=collate, num_workers=0)


def bf16(args) -> bool:
    """``--precision``: bf16 (the configs' mixed precision, the peer's --mixed_precision=bf16) or fp32; auto = bf16
    on a GPU, fp32 on CPU (where bf16 is fast only on CPUs with bf16 instructions)."""
    p = getattr(args, "precision", "auto")
    return p == "bf16" or (p == "auto" and torch.cuda.is_available())


def run_peer(args, full: bool, hook=None, checkpointing: bool = True) -> dict:
    """``full=False``: the diffusers LoRA script; ``full=True``: Salesforce's full fine-tune + frozen copy;
    ``checkpointing``: the README's ``--gradient_checkpointing``."""
    import copy

    import torch.nn.functional as F

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wdtype = torch.bfloat16 if bf16(args) else torch.float32
    comp = components(args.size, args.latent, args.model_dir)
    unet, vae, te, te2 = comp.unet, comp.vae, comp.text_encoder, comp.text_encoder_2
    for m in (unet, vae, te) + ((te2,) if te2 is not None else ()):
        m.requires_grad_(False)
        if m is not unet:
            m.to(dev, dtype=wdtype)
    if full:
        ref = copy.deepcopy(unet).to(dev).eval()  # Salesforce keeps the reference in fp32
        unet.requires_grad_(True).to(dev)
        params = list(unet.parameters())
    else:
        from peft import LoraConfig

        unet.to(dev, dtype=wdtype)
        unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(params, lr=1e-5)
    px = image_px(args.size, args.latent)
    loader = peer_loader(Path(args.data), px, args.batch, comp.tokenizer)
    sched, beta = comp.noise_scheduler, 5000.0
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16(args))
    times, it = [], iter(loader)
    reset_train_peak()
    for step in range(args.steps + 1):
        sync()
        t0 = time.perf_counter()
        batch = next(it)
        with amp:
            pv = batch["pixel_values"].to(dev, dtype=wdtype)
            feed = torch.cat(pv.chunk(2, dim=1))
            with torch.no_grad():
                lat = vae.encode(feed).latent_dist.sample() * vae.config.scaling_factor
                ids = batch["input_ids"].to(dev)
                if te2 is None:
                    emb, extra = te(ids)[0].repeat(2, 1, 1), {}
                else:  # the SDXL script: penultimate states of both encoders, te2's pooled output, time ids
                    o1, o2 = te(ids, output_hidden_states=True), te2(ids, output_hidden_states=True)
                    emb = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], -1).repeat(2, 1, 1)
                    time_ids = torch.tensor([[px, px, 0, 0, px, px]], device=dev, dtype=emb.dtype)
                    extra = {"added_cond_kwargs": {"text_embeds": o2[0].repeat(2, 1),
                                                   "time_ids": time_ids.repeat(emb.shape[0], 1)}}
            noise = torch.randn_like(lat).chunk(2)[0].repeat(2, 1, 1, 1)
            t = torch.randint(0, sched.config.num_train_timesteps, (lat.shape[0] // 2,), device=dev).repeat(2)
            noisy = sched.add_noise(lat, noise, t)
            pred = unet(noisy, t, emb, **extra).sample
            mse = F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
            if full:
                with torch.no_grad():
                    ref_pred = ref(noisy, t, emb, **extra).sample
            else:
                unet.disable_adapters()
                with torch.no_grad():
                    ref_pred = unet(noisy, t, emb, **extra).sample.detach()
                unet.enable_adapters()
            ref_mse = F.mse_loss(ref_pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
            (mw, ml), (rw, rl) = mse.chunk(2), ref_mse.chunk(2)
            loss = -F.logsigmoid(-0.5 * beta * ((mw - ml) - (rw - rl))).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        sync()
        times.append(time.perf_counter() - t0)
        if hook is not None:
            hook()
    return {"step_times": times[1:], "peak_mb": peak_memory_mb(), "train_peak_mb": train_peak_mb(),
            "trainable": sum(p.numel() for p in params)}


# ------------------------------------------------------------------ mmalign (child process)


def mmalign_config(args, precomputed: bool, first_pass: bool = False, sweep: str | None = None):
    from mmalign.train.sections import load_config

    work = Path(args.work)
    over = [f"model.name_or_path={args.model_dir}", f"model.kind={'sdxl' if args.size in XL else 'sd'}",
            f"data.train={args.data}", "data.eval=null",
            f"data.cache_dir={work / 'fresh-cache' if first_pass else work.parent / 'cache'}",
            f"data.resolution={image_px(args.size, args.latent)}", f"model.lora.r={args.rank}",
            f"model.lora.alpha={args.rank}", f"train.output_dir={work / 'run'}", f"train.max_steps={args.steps + 1}",
            f"train.batch_size={args.batch}", "train.grad_accum=1", "train.log_every=1", "train.progress=false",
            "train.eval_every=0", "train.save_every=0", "train.report_to=[jsonl]", "train.num_workers=0",
            "validation.prompts=[]"]
    over.append("train.optimizer=adamw")  # as the peer path (the config's 8-bit Adam needs bitsandbytes)
    if not bf16(args):  # the configs' bf16 mixed precision, or fp32 (--precision; the default on CPU)
        over.append("train.mixed_precision=no")
    if precomputed:
        over += ["model.reference=precomputed", "data.noise_draws=1"]
    elif not first_pass:  # the steady state: the whole cache, as a run reading its data twice builds it
        over.append("data.cache_build=before_training")
        if sweep is None:  # a later epoch: draws no earlier step made (mmalign_sweep reads the record)
            over.append("model.reference_record=false")
        elif sweep == "run":  # a later run of a sweep over beta; the first (sweep == "record") keeps the config's
            over.append("loss.beta=2500")
    over += args.overrides  # --overrides: measure a lever, e.g. model.channels_last=true
    if args.size in XL:
        over.append("model.vae=null")  # the config's fp16-fix VAE is a hub id; the bench model has its own
    name = "sdxl" if args.size in XL else "sd15"
    return load_config(ROOT / f"configs/{name}/diffusion_dpo_lora.yaml", over)


def run_mmalign(args, precomputed: bool, hook=None, first_pass: bool = False, sweep: str | None = None) -> dict:
    from accelerate import Accelerator

    from mmalign.train.diffusion import DiffusionRecipe
    from mmalign.train.loop import train

    cfg = mmalign_config(args, precomputed, first_pass, sweep)
    if first_pass:  # data nobody has cached, every run
        shutil.rmtree(Path(args.work) / "fresh-cache", ignore_errors=True)
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available())
    cached = not first_pass and any((Path(args.work).parent / "cache").glob("train-*/meta.json"))
    t0 = time.perf_counter()
    recipe = DiffusionRecipe(cfg, acc)  # loads the pipeline folder itself, as `mmalign train` does
    setup = time.perf_counter() - t0  # loading; building the cache (first run only); precomputed reference scores
    reset_train_peak()
    res = train(recipe, cfg.train, acc, on_step=(lambda step, rec: hook()) if hook else None)
    return {"step_times": [r["train/sec_per_step"] for r in res.history][1:], "peak_mb": peak_memory_mb(),
            "train_peak_mb": train_peak_mb(),
            "setup_s": setup, "cache_reused": cached,
            "reference_reads": sum(r.reads for r in recipe.records.values()),  # batches whose reference was read
            "checkpointing": getattr(recipe.unet, "_mmalign_checkpointing", recipe.unet.is_gradient_checkpointing),
            "trainable": sum(p.numel() for p in recipe.trainable_parameters())}


OTHER_PEERS = ("peer_kept_heap", "peer_no_ckpt")  # peers with a setting of mmalign's: ratios against each


def other_peer_keys(other: str) -> list[tuple[str, str]]:
    """(JSON key, mmalign path) of the ratios against the peer path ``other``."""
    return [(f"speed_ratio_vs_{other}", "mmalign"), (f"first_pass_ratio_vs_{other}", "mmalign_first_pass"),
            (f"speed_ratio_vs_{other}_sweep", "mmalign_sweep")]


def run_path(args, hook=None) -> dict:
    """Run ``args.path`` (``hook`` after every step: the profiler's)."""
    torch.manual_seed(0)
    if args.path in OTHER_PEERS:  # the peers run with mmalign's CPU heap setting
        from mmalign.utils import keep_cpu_heap

        keep_cpu_heap()
    if args.path in PEERS:
        return run_peer(args, full=args.path == "salesforce", hook=hook, checkpointing=args.path != "peer_no_ckpt")
    sweep = {"mmalign_sweep": "run", "mmalign_sweep_record": "record"}.get(args.path)
    return run_mmalign(args, precomputed=args.path == "mmalign_precomputed", hook=hook,
                       first_pass=args.path == "mmalign_first_pass", sweep=sweep)


def child(args) -> None:
    print("RESULT " + json.dumps(run_path(args)), flush=True)


def profile(args) -> None:
    """torch.profiler over the second step of a path only (after the setup, cache build and a warm-up step);
    prints the top ops by self CPU (or CUDA) time."""
    from torch.profiler import ProfilerActivity, profile as prof, schedule

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    args.steps = 1  # two steps: the first (and everything before it) is skipped, the second is recorded
    args.path = args.profile
    with prof(activities=acts, schedule=schedule(wait=1, warmup=0, active=1)) as p:
        run_path(args, p.step)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(p.key_averages().table(sort_by=key, row_limit=15))
    ops = sorted(((e.key, e.count) for e in p.key_averages() if e.key.startswith("aten::")), key=lambda x: -x[1])
    print("OPS " + json.dumps({"path": args.profile, "aten_ops": sum(c for _, c in ops),
                               "optimizer_ops": optimizer_ops(p.events()), "top": ops[:12]}))


def optimizer_ops(events) -> int:
    """The aten ops recorded inside ``Optimizer.step`` (on CUDA torch's AdamW is its foreach kernels by default, on
    CPU a loop over the tensors unless fused): the rest are the model's forward / backward and the step's checks."""
    def inside(e):
        while e is not None:
            if e.name.startswith("Optimizer.step"):
                return True
            e = e.cpu_parent
        return False
    return sum(1 for e in events if e.name.startswith("aten::") and inside(e))


def count_ops(args) -> dict:
    """Dispatched aten ops of one warmed step of the peer and of mmalign (``--profile`` of each in its own
    process; every aten op the profiler records, nested ones included): the host-side work a GPU step waits on."""
    res = {}
    for path in ("peer", "mmalign"):
        cmd = [sys.executable, __file__, "--profile", path, "--size", args.size, "--latent", str(args.latent),
               "--batch", str(args.batch), "--rank", str(args.rank), "--precision", args.precision,
               "--overrides", *args.overrides]
        r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
        line = [x for x in r.stdout.splitlines() if x.startswith("OPS ")]
        res[path] = json.loads(line[-1][4:]) if line else {"error": r.stderr[-1500:]}
    return res


def ops_summary(args) -> dict:
    """``count_ops`` at ``args.size`` / ``args.latent``, printed as a table; ``ops`` per path and
    ``ops_ratio_vs_peer`` (mmalign / peer) for the JSON line."""
    from mmalign.utils import print_table

    res = count_ops(args)
    rows = [[k, v.get("aten_ops", "failed"), v.get("optimizer_ops", ""), ", ".join(f"{n} {c}" for n, c in v.get("top", [])[:5])]
            for k, v in res.items()]
    print(f"\ndispatched aten ops of one warmed step, {args.size} layout ({args.latent}x{args.latent} latents), "
          f"{args.batch} pair(s), rank {args.rank}")
    print_table(["path", "aten ops", "in optimizer.step", "most frequent"], rows)
    out = {"ops": {k: v.get("aten_ops") for k, v in res.items()}, "ops_layout": args.size}
    if all("aten_ops" in v for v in res.values()):
        out["ops_ratio_vs_peer"] = round(res["mmalign"]["aten_ops"] / res["peer"]["aten_ops"], 3)
        out["optimizer_ops"] = {k: v["optimizer_ops"] for k, v in res.items()}
        model = {k: v["aten_ops"] - v["optimizer_ops"] for k, v in res.items()}
        out["ops_ratio_vs_peer_without_optimizer"] = round(model["mmalign"] / model["peer"], 3)
    for k, v in res.items():
        if "error" in v:
            print(f"{k} failed:\n{v['error']}")
    return out


def paired_ratios(peer_runs: list[dict], our_runs: list[dict]) -> list[float]:
    """Speed ratio of each interleaved repeat: the peer run's median step time over ours in the same repeat (the
    machine's state drifts between repeats; within one it is shared), so the spread of these ratios is the noise."""
    med = lambda r: statistics.median(r["step_times"])  # noqa: E731
    return [med(p) / med(o) for p, o in zip(peer_runs, our_runs) if "error" not in p and "error" not in o]


def verdict(ratios: list[float]) -> str:
    """``faster`` / ``slower`` only when every repeat agrees (the spread does not cross 1); ``within noise`` when
    the repeats disagree -- a spread larger than the effect is no result; one repeat gives no verdict."""
    if len(ratios) < 2:
        return "one repeat: no verdict (use --repeats 2 or more)"
    if min(ratios) > 1:
        return "faster"
    if max(ratios) < 1:
        return "slower"
    return "within noise"


def launch(path: str, args, work: Path) -> dict:
    if args.in_process:  # --in-process (a dry run of the GPU check): no isolation, so the memory figures are void
        import copy
        import traceback

        a = copy.copy(args)
        a.path, a.data, a.work, a.model_dir = path, str(work / "pairs.parquet"), str(work / path), str(work / "model")
        a.steps = 1 if path == "salesforce" else args.steps
        try:
            return run_path(a)
        except Exception:
            return {"error": traceback.format_exc()[-1500:]}
    cmd = [sys.executable, __file__, "--path", path, "--size", args.size, "--latent", str(args.latent),
           "--steps", str(1 if path == "salesforce" else args.steps), "--batch", str(args.batch),
           "--rank", str(args.rank), "--precision", args.precision, "--overrides", *args.overrides,
           "--data", str(work / "pairs.parquet"), "--work", str(work / path), "--model-dir", str(work / "model")]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        return {"error": (p.stderr or p.stdout)[-1500:]}
    out = json.loads(line[0][7:])
    out["wall_s"] = time.perf_counter() - t0
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="sd15")
    ap.add_argument("--latent", type=int, default=16, help="latent side (image side = 8x for SD VAEs)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved runs of every path (the spread of their "
                    "paired ratios decides the verdict)")
    ap.add_argument("--batch", type=int, default=1, help="pairs per step")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (the peer README's --rank=8)")
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                    help="auto: bf16 mixed precision on a GPU, fp32 on CPU; bf16 on a CPU with bf16 instructions "
                    "runs both sides as on a GPU (bf16 frozen weights, fp32 LoRA, autocast)")
    ap.add_argument("--overrides", nargs="*", default=[],
                    help="config overrides for the mmalign paths (e.g. model.channels_last=true)")
    ap.add_argument("--profile", choices=[p for p in (*PATHS, "peer_no_ckpt") if p != "mmalign_sweep"],
                    help="profile one step of this path instead")
    ap.add_argument("--ops", action="store_true", help="count the dispatched aten ops of one step, peer vs mmalign "
                    "(e.g. --size sdxl_layout --latent 8), instead of timing")
    ap.add_argument("--ops-layout", choices=[*SIZES, "none"], default="sdxl_layout",
                    help="a run of the default paths on CPU also counts the dispatched ops of one step, peer vs "
                    "mmalign, at this layout with 8x8 latents (about a minute for sdxl_layout): ops_ratio_vs_peer; "
                    "none: skip")
    ap.add_argument("--in-process", action="store_true", help="run every path in this process (quick smoke test, "
                    "e.g. gpu_check.sh --dry-run: the memory figures then mean nothing)")
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--make-model", help=argparse.SUPPRESS)
    args = ap.parse_args()
    t_all = time.perf_counter()
    if args.make_model:
        components(args.size, args.latent, args.make_model)
        return None
    if args.path:
        return child(args)
    if args.ops:
        out = {"size": args.size, "latent": args.latent, "batch": args.batch, "overrides": args.overrides,
               "precision": "bf16" if bf16(args) else "fp32", **ops_summary(args)}
        print("JSON " + json.dumps(out))
        return None
    from mmalign.diffusion.data import write_pickapic_parquet
    from mmalign.toyworld.world import synthetic_pairs
    from mmalign.utils import print_table

    paths = args.paths.split(",")
    if torch.cuda.is_available() and args.paths == ap.get_default("paths"):
        paths.remove("peer_kept_heap")  # a CPU allocator setting: nothing to separate on a GPU
    work = Path(tempfile.mkdtemp(prefix="mmalign-bench-"))
    px = image_px(args.size, args.latent)
    rows = args.batch * (args.steps + 1)  # the rows one run reads: what the cache / precompute cover
    write_pickapic_parquet(work / "pairs.parquet", synthetic_pairs(rows, seed=0, image_size=px))
    args.model_dir = str(work / "model")
    # random weights written once, loaded by every run -- in a child process: a child's peak RSS starts at its
    # parent's RSS at fork time (Linux carries the high-water mark across fork and exec), so the parent must
    # never hold the model
    if args.in_process:
        components(args.size, args.latent, args.model_dir)
    else:
        subprocess.run([sys.executable, __file__, "--make-model", args.model_dir, "--size", args.size, "--latent",
                        str(args.latent)], check=True, env=dict(os.environ, TQDM_DISABLE="1"))
    if args.profile:
        args.data, args.work = str(work / "pairs.parquet"), str(work / args.profile)
        return profile(args)
    runs: dict[str, list[dict]] = {p: [] for p in paths}
    for rep in range(args.repeats):
        for path in paths:
            if path in RUN_ONCE and rep > 0 and runs[path] and "error" not in runs[path][0]:
                continue
            if path == "mmalign_sweep" and not runs[path]:
                print("  mmalign_sweep's first run (untimed): records the reference scores", flush=True)
                first = launch("mmalign_sweep_record", args, work)
                if "error" in first:
                    print(f"  mmalign_sweep_record failed:\n{first['error']}", flush=True)
            print(f"repeat {rep + 1}/{args.repeats}: {path} ...", flush=True)
            r = launch(path, args, work)
            if "error" in r:
                print(f"  {path} failed:\n{r['error']}", flush=True)
            runs[path].append(r)
    shutil.rmtree(work, ignore_errors=True)
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    summary = {}
    for path, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            summary[path] = {"error": rs[0]["error"][-300:]}
            continue
        times = [t for r in ok for t in r["step_times"]]
        s = {"sec_per_step": statistics.median(times), "timed_steps": len(times),
             "step_times": [round(t, 2) for t in times],
             "peak_mb": max(r["peak_mb"] for r in ok if r.get("cache_reused", True)) if any(
                 r.get("cache_reused", True) for r in ok) else max(r["peak_mb"] for r in ok),
             "peak_mb_first_run": ok[0]["peak_mb"], "trainable": ok[0]["trainable"]}
        if all("train_peak_mb" in r for r in ok):
            s["train_peak_mb"] = max(r["train_peak_mb"] for r in ok)
        if "setup_s" in ok[0]:
            s["setup_s"] = [round(r["setup_s"], 1) for r in ok]
            s["cache_reused"] = [r["cache_reused"] for r in ok]
            s["reference_reads"] = [r["reference_reads"] for r in ok]
            s["checkpointing"] = ok[0].get("checkpointing")
        summary[path] = s
    # one pass over uncached data: the one-off work (building the cache; precomputing the reference) -- a first
    # run's setup less the loading every run does (the peer's too) -- shared out over that run's steps. The
    # loading time is the mmalign path's setup on a reused cache; the precomputed path reuses that cache.
    mm = [r for r in runs.get("mmalign", []) if "error" not in r]
    load = statistics.median([r["setup_s"] for r in mm if r["cache_reused"]] or [0.0])
    cache_extra = max(0.0, mm[0]["setup_s"] - load) if mm and not mm[0]["cache_reused"] else 0.0
    for path in ("mmalign", "mmalign_precomputed"):
        ok = [r for r in runs.get(path, []) if "error" not in r]
        if not ok:
            continue
        own = max(0.0, ok[0]["setup_s"] - load) if path == "mmalign_precomputed" else 0.0
        s = summary[path]
        s["cache_build_s"] = round(cache_extra, 1)
        s["first_pass_sec_per_step"] = s["sec_per_step"] + (cache_extra + own) / (len(ok[0]["step_times"]) + 1)
    if "sec_per_step" in summary.get("mmalign_first_pass", {}):  # measured: the steps on uncached data themselves
        summary["mmalign_first_pass"]["first_pass_sec_per_step"] = summary["mmalign_first_pass"]["sec_per_step"]
    print(f"\nDiffusion-DPO LoRA step: {args.size}-sized UNet (real config, random weights), {px}x{px} images "
          f"({args.latent}x{args.latent} latents), {args.batch} pair(s)/step, rank {args.rank}, {device}, "
          f"{'bf16 mixed precision' if bf16(args) else 'fp32'}; "
          f"median of {args.steps} timed steps x {args.repeats} interleaved runs (salesforce: 1 run, 1 step; "
          f"precomputed: 1 run, {args.steps} steps); 'first pass' = one pass over uncached data (mmalign_first_pass "
          f"measured; mmalign: its step plus building the whole cache first)")
    peer, sf = summary.get("peer", {}), summary.get("salesforce", {})
    table = []
    for path, s in summary.items():
        if "error" in s:
            table.append([path, "failed", "", "", "", "", "", "", ""])
            continue
        vs = lambda b, k: f"{b[k] / s[k]:.2f}x" if k in b else "-"  # noqa: E731
        mem = f"{s['peak_mb'] / peer['peak_mb']:.2f}x" if "peak_mb" in peer else "-"
        first = f"{peer['sec_per_step'] / s['first_pass_sec_per_step']:.2f}x" if "first_pass_sec_per_step" in s \
            and "sec_per_step" in peer else "-"
        tmem = f"{s['train_peak_mb'] / peer['train_peak_mb']:.2f}x" if "train_peak_mb" in peer and \
            "train_peak_mb" in s else "-"
        table.append([path, f"{s['sec_per_step']:.2f}", vs(peer, "sec_per_step"), vs(sf, "sec_per_step"), first,
                      f"{s['peak_mb']:.0f}", mem, f"{s.get('train_peak_mb', float('nan')):.0f}", tmem])
    print_table(["path", "s/step", "speed vs peer", "speed vs salesforce", "first pass vs peer", "peak MB",
                 "memory vs peer", "training peak MB", "training memory vs peer"], table)
    out = {"size": args.size, "latent": args.latent, "batch": args.batch, "rank": args.rank, "device": device,
           "precision": "bf16" if bf16(args) else "fp32", "overrides": args.overrides, "paths": summary}
    suffixes = {"mmalign": "", "mmalign_sweep": "_sweep", "mmalign_precomputed": "_precomputed"}
    for name, suffix in suffixes.items():
        s = summary.get(name, {})
        if "sec_per_step" not in s:
            continue
        if "sec_per_step" in peer:
            out[f"speed_ratio_vs_peer{suffix}"] = round(peer["sec_per_step"] / s["sec_per_step"], 3)
            ratios = paired_ratios(runs["peer"], runs[name])
            out[f"speed_ratio_vs_peer_per_repeat{suffix}"] = [round(r, 3) for r in ratios]
            out[f"speed_verdict{suffix}"] = verdict(ratios)
            out[f"memory_ratio_vs_peer{suffix}"] = round(s["peak_mb"] / peer["peak_mb"], 3)
            if "train_peak_mb" in s and "train_peak_mb" in peer:
                out[f"train_memory_ratio_vs_peer{suffix}"] = round(s["train_peak_mb"] / peer["train_peak_mb"], 3)
            key = "first_pass_ratio_vs_peer_built_up_front" if name == "mmalign" else f"first_pass_ratio_vs_peer{suffix}"
            if "first_pass_sec_per_step" in s:
                out[key] = round(peer["sec_per_step"] / s["first_pass_sec_per_step"], 3)
        if "sec_per_step" in sf:
            out[f"speed_ratio_vs_salesforce{suffix}"] = round(sf["sec_per_step"] / s["sec_per_step"], 3)
    for other in OTHER_PEERS:
        kept = summary.get(other, {})
        for key, name in other_peer_keys(other):
            if "sec_per_step" in kept and "sec_per_step" in summary.get(name, {}):
                out[key] = round(kept["sec_per_step"] / summary[name]["sec_per_step"], 3)
                out[key + "_per_repeat"] = [round(r, 3) for r in paired_ratios(runs[other], runs[name])]
    first = summary.get("mmalign_first_pass", {})
    if "sec_per_step" in first and "sec_per_step" in peer:
        ratios = paired_ratios(runs["peer"], runs["mmalign_first_pass"])
        out["first_pass_ratio_vs_peer"] = round(peer["sec_per_step"] / first["sec_per_step"], 3)
        out["first_pass_ratio_vs_peer_per_repeat"] = [round(r, 3) for r in ratios]
        out["first_pass_verdict"] = verdict(ratios)
        out["memory_ratio_vs_peer_first_pass"] = round(first["peak_mb"] / peer["peak_mb"], 3)
        rs = out["first_pass_ratio_vs_peer_per_repeat"]
        print(f"mmalign_first_pass vs peer: {out['first_pass_verdict']}"
              + (f" (repeats {min(rs):.2f}x-{max(rs):.2f}x)" if rs else ""))
    for name, suffix in suffixes.items():
        if f"speed_verdict{suffix}" in out:
            rs = out[f"speed_ratio_vs_peer_per_repeat{suffix}"]
            span = f" (repeats {min(rs):.2f}x-{max(rs):.2f}x)" if rs else ""
            print(f"{name} vs peer: {out[f'speed_verdict{suffix}']}{span}")
    for key in [k for other in OTHER_PEERS for k, _ in other_peer_keys(other)]:
        if key in out:
            rs = out[key + "_per_repeat"]
            print(f"{key}: {out[key]:.2f}x" + (f" (repeats {min(rs):.2f}x-{max(rs):.2f}x)" if rs else ""))
    if args.ops_layout != "none" and set(PATHS) <= set(paths) and not args.in_process \
            and not torch.cuda.is_available():  # the host-side op count (#27's target is at SDXL's layout)
        out.update(ops_summary(argparse.Namespace(**{**vars(args), "size": args.ops_layout, "latent": 8})))
        print(f"ops_ratio_vs_peer ({args.ops_layout} layout): {out.get('ops_ratio_vs_peer', 'failed')}, without "
              f"the optimizer's: {out.get('ops_ratio_vs_peer_without_optimizer', 'failed')}")
    out["total_s"] = round(time.perf_counter() - t_all, 1)
    print("JSON " + json.dumps(out))


if __name__ == "__main__":
    main()
