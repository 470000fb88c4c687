"""Recipe ``diffusion``: Diffusion-DPO (and any pairwise loss of the core) on SD 1.5 / 2.1 / SDXL.

Per step and pair: one generator keyed by (seed, step, row) draws the flip, the caption dropout, the
noise and t -- all shared by winner and loser; images (or cached latents) and prompts are encoded by
the frozen VAE / text encoders; winner and loser go through the UNet in one 2B forward; the
reference is the same UNet with LoRA disabled, a frozen copy, or precomputed; scores are ``-mse``
and the loss core gets beta/2 (Salesforce convention, ``DiffusionConfig``).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
from pathlib import Path

import torch

from mmalign.diffusion.cache import CachedPairs, build_cache
from mmalign.diffusion.data import ImagePairBatch, PreferencePairs, make_grid
from mmalign.diffusion.models import Components, load_components, tiny_components
from mmalign.diffusion.scoring import Cond, draw_noise, encode_prompts, pair_mse
from mmalign.losses import MetricSums, RunningMoments

from .configs import DiffusionConfig
from .loop import StepOutput, eval_summary, example_generator, make_accelerator, train

Tensor = torch.Tensor
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def frozen_dtype(cfg: DiffusionConfig) -> torch.dtype:
    if cfg.model.frozen_dtype != "auto":
        return getattr(torch, cfg.model.frozen_dtype)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision, torch.float32)


def build_components(cfg: DiffusionConfig, dtype: torch.dtype) -> Components:
    m = cfg.model
    if m.tiny is not None:
        tiny = dict(m.tiny)
        if m.prediction_type != "auto":
            tiny["prediction_type"] = m.prediction_type
        return tiny_components(m.kind, **tiny)
    return load_components(m.kind, m.name_or_path, vae=m.vae, prediction_type=m.prediction_type, dtype=dtype)


def frozen_like_policy(module):
    """A frozen module computing exactly like the policy: train mode with every dropout at 0.

    Not ``eval()``: diffusers' ResnetBlock2D makes its shortcut input contiguous only in training,
    which changes conv kernels and MSE by ~1e-7 -- enough, at beta = 5000, to move the step-0 loss
    off ln 2 by 1e-4."""
    module.requires_grad_(False)
    module.train()
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return module


def set_attention(unet, backend: str):
    if backend == "xformers":
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            raise ImportError("model.attention=xformers needs xformers (pip install 'mmalign[gpu]', CUDA only); "
                              "the default model.attention=sdpa needs nothing")
        unet.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())


class DiffusionRecipe:
    def __init__(self, cfg: DiffusionConfig, accelerator, components: Components | None = None):
        self.cfg, self.acc = cfg, accelerator
        self.loss_fn, self.hp = cfg.loss.fn, dict(cfg.loss.params)
        self.beta = float(self.hp.pop("beta", 5000.0))
        dev, self.dtype = accelerator.device, frozen_dtype(cfg)
        comp = components or build_components(cfg, self.dtype)
        self.comp = comp
        self.empty_text = None  # cached empty-prompt embedding (caption dropout with a text cache)
        unet = comp.unet
        set_attention(unet, cfg.model.attention)
        for mod in comp.frozen_modules():
            mod.requires_grad_(False)
            mod.eval()
            mod.to(dev) if self.dtype == torch.float32 else mod.to(dev, dtype=self.dtype)
        if cfg.model.lora is not None:
            from peft import LoraConfig

            lo = cfg.model.lora
            unet.requires_grad_(False)
            unet.add_adapter(LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                                        init_lora_weights="gaussian" if lo.init == "gaussian" else True,
                                        target_modules=lo.target_modules or LORA_TARGETS))
            for p in unet.parameters():  # trainable LoRA weights stay fp32 (diffusers convention)
                if p.requires_grad:
                    p.data = p.data.float()
        else:
            unet.requires_grad_(True)
        self.user_emb: dict = {}
        if cfg.ppd is not None:
            self._setup_ppd(unet)
        if cfg.model.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        unet.to(dev)
        self.unet = unet  # unwrapped handle
        self.model = torch.compile(unet) if cfg.model.compile else unet
        self.pipe = comp.pipeline(unet)
        self.vae_scale = comp.vae.config.scaling_factor
        self.latent_channels = comp.unet.config.in_channels

        d = cfg.data
        self.train_data = self._pairs(d.train, d.split, d.max_examples)
        self.eval_data = self._pairs(d.eval, d.eval_split, d.max_eval_examples) if d.eval else None
        if d.cache_dir:
            self.train_data = self._cached(self.train_data, Path(d.cache_dir) / "train")
            if self.eval_data is not None:
                self.eval_data = self._cached(self.eval_data, Path(d.cache_dir) / "eval")

        kind = cfg.model.reference
        if kind == "auto":
            kind = "peft" if cfg.model.lora is not None else "copy"
        self.ref_kind = kind
        self.ref_unet = None
        if kind == "copy":
            self.ref_unet = frozen_like_policy(copy.deepcopy(unet))
            if self.dtype != torch.float32:
                self.ref_unet.to(dtype=self.dtype)
            if cfg.model.reference_offload and dev.type == "cuda":
                from accelerate import cpu_offload

                cpu_offload(self.ref_unet, execution_device=dev)
        self.ema = None
        if cfg.model.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.trainable_parameters(), decay=cfg.model.ema_decay, foreach=True)
        self.running = RunningMoments() if "running" in self.loss_fn.uses else None
        if d.label_mode == "soft" and "label_smoothing" in self.hp:
            raise ValueError("data.label_mode=soft sets label_smoothing per pair; remove loss.label_smoothing")
        self.scorer = self._validation_scorer()  # fn(images, prompts) -> list[float]; the demo sets the oracle
        self.best_reward, self.best_step, self.evals_since_best, self.stop = -math.inf, None, 0, False
        self.samples_dir = Path(cfg.train.output_dir) / "samples"
        self.ref_tables: dict[str, Tensor] = {}
        if kind == "precomputed":
            self.ref_tables["train"] = self.precompute(self.train_data, "train", d.noise_draws)
            if self.eval_data is not None:
                self.ref_tables["eval"] = self.precompute(self.eval_data, "eval", 1)

    def _setup_ppd(self, unet):
        """Embed every user from their first examples, then add the user branch to the UNet."""
        from mmalign.diffusion.users import ClipPreferenceEncoder, add_user_branch
        from mmalign.rewards import load_reward

        p, d = self.cfg.ppd, self.cfg.data
        pairs = self._pairs(d.train, d.split, d.max_examples)
        enc = ClipPreferenceEncoder(load_reward(p.encoder, model=p.encoder_model, device=self.acc.device,
                                                tiny=p.encoder_tiny).backbone)
        by_user: dict = {}
        for i, uid in enumerate(pairs.ds["user_id"][j] for j in pairs.rows):
            if len(by_user.setdefault(str(uid), [])) < p.examples_per_user:
                by_user[str(uid)].append(i)
        for uid, rows in by_user.items():
            ims = [pairs.load_images(i) for i in rows]
            self.user_emb[uid] = enc.embed([a for a, _ in ims], [b for _, b in ims])
        dim = next(iter(self.user_emb.values())).numel()
        add_user_branch(unet, dim, p.n_tokens, p.scale)

    def user_embedding(self, user_id) -> Tensor:
        if str(user_id) not in self.user_emb:
            raise KeyError(f"unknown user_id {user_id!r}; known users: {sorted(self.user_emb)}")
        return self.user_emb[str(user_id)]

    def _validation_scorer(self):
        v = self.cfg.validation
        if v.reward is None:
            return None
        from mmalign.rewards import load_reward
        from mmalign.rewards.cli import list_images, read_images

        reward = load_reward(v.reward, model=v.reward_model, device=self.acc.device, **v.reward_args)
        refs = read_images(list_images(v.references))[1] if v.references else None
        if reward.needs_references and not refs:
            raise ValueError(f"validation.reward={v.reward} needs validation.references (a folder of images)")
        return lambda images, prompts: reward.score(images, prompts if reward.needs_prompts else None,
                                                    refs).tolist()

    # ------------------------------------------------------------------ data

    def _pairs(self, source, split, max_examples):
        d = self.cfg.data
        return PreferencePairs(source, split, d.resolution, d.center_crop, d.drop_ties, d.columns, max_examples,
                               seed=self.cfg.train.seed, dual_captions=d.dual_captions,
                               soft_labels=d.label_mode == "soft", with_user=self.cfg.ppd is not None)

    def _cached(self, pairs: PreferencePairs, path: Path) -> CachedPairs:
        if self.acc.is_main_process:
            build_cache(pairs, self.encode_pixels, path, encode_text=self.encode_text,
                        flips=self.cfg.data.random_flip, progress=self.cfg.train.progress)
        self.acc.wait_for_everyone()
        cached = CachedPairs(path, pairs)
        self.empty_text = cached.empty
        return cached

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[Tensor, Tensor | None]:
        if self.comp.kind == "sdxl":
            e, _, p, _ = self.pipe.encode_prompt(captions, device=self.acc.device, num_images_per_prompt=1,
                                                 do_classifier_free_guidance=False)
            return e, p
        e, _ = self.pipe.encode_prompt(captions, device=self.acc.device, num_images_per_prompt=1,
                                       do_classifier_free_guidance=False)
        return e, None

    @torch.no_grad()
    def encode_pixels(self, pixels: Tensor) -> Tensor:
        """[B, 2, 3, H, W] in [-1, 1] -> latents [B, 2, C, h, w] (posterior mean x scaling factor; the
        posterior std of SD VAEs is negligible, and the mean makes latents cacheable and deterministic)."""
        b = pixels.shape[0]
        x = pixels.flatten(0, 1).to(self.acc.device, self.dtype)
        lat = self.comp.vae.encode(x).latent_dist.mean * self.vae_scale
        return lat.float().view(b, 2, *lat.shape[1:])

    # ------------------------------------------------------------------ bookkeeping

    def describe(self) -> str:
        n = sum(p.numel() for p in self.unet.parameters())
        t = sum(p.numel() for p in self.trainable_parameters())
        return (f"diffusion/{self.cfg.loss.name} {self.comp.kind} ({self.comp.prediction_type}) | UNet {n / 1e6:.2f}M "
                f"({t / 1e6:.3f}M trainable{', LoRA' if self.cfg.model.lora else ''}) | reference {self.ref_kind} | "
                f"beta {self.beta:g} | {self.train_data.describe()}")

    def trainable_parameters(self):
        return [p for p in self.unet.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, Tensor]:
        named = [(k, p) for k, p in self.unet.named_parameters() if p.requires_grad]
        state = {k: p.detach() for k, p in named}
        if self.ema is not None:
            state.update({f"ema/{k}": s for (k, _), s in zip(named, self.ema.shadow_params)})
        return state

    def load_trainable_state(self, state: dict[str, Tensor]):
        named = [(k, p) for k, p in self.unet.named_parameters() if p.requires_grad]
        missing = [k for k, _ in named if k not in state]
        if missing:
            raise KeyError(f"checkpoint lacks trainable weights {missing[:5]}")
        with torch.no_grad():
            for k, p in named:
                p.copy_(state[k])
            if self.ema is not None:
                for (k, _), s in zip(named, self.ema.shadow_params):
                    s.copy_(state[f"ema/{k}"])

    def extra_state(self) -> dict:
        out = {}
        if self.running:
            out["running"] = self.running.state_dict()
        if self.ema is not None:
            out["ema_step"] = self.ema.optimization_step
        return out

    def load_extra_state(self, d: dict):
        if self.running and "running" in d:
            self.running.load_state_dict(d["running"])
        if self.ema is not None and "ema_step" in d:
            self.ema.optimization_step = d["ema_step"]

    def on_step_end(self, step: int, applied: bool = True):
        if self.ema is not None and applied:
            self.ema.step(self.trainable_parameters())
        if self.running is not None:  # BCO: this step's rewards, all micro-batches and processes, at once
            red = (lambda t: self.acc.reduce(t.to(self.acc.device), reduction="sum").cpu()) \
                if self.acc.num_processes > 1 else None
            self.running.commit(red) if applied else self.running.discard()

    # ------------------------------------------------------------------ scoring

    def _generator(self, step: int, row: int, split: str) -> torch.Generator:
        seed, draws = self.cfg.train.seed, self.cfg.data.noise_draws
        if split == "eval":
            return example_generator(seed, 0, row, salt=2)
        if draws:
            return example_generator(seed, step % draws, row, salt=1)
        return example_generator(seed, step, row)

    def _inputs(self, batch: ImagePairBatch, gens: list[torch.Generator], split: str):
        """Draw flip / dropout / noise / t in a fixed order and build (x0, noise, t, cond for 2B)."""
        dev, d = self.acc.device, self.cfg.data
        flip = [bool(torch.rand(1, generator=g) < 0.5) and d.random_flip and split == "train" for g in gens]
        drop = [bool(torch.rand(1, generator=g) < d.caption_dropout) for g in gens]
        if batch.latents is not None:
            x0 = torch.stack([(batch.latents_flip[i] if f else batch.latents[i]) for i, f in enumerate(flip)])
            x0 = x0.to(dev, torch.float32)
        else:
            pix = torch.stack([p.flip(-1) if f else p for p, f in zip(batch.pixels, flip)])
            x0 = self.encode_pixels(pix)
        noise, t = draw_noise(tuple(x0.shape[2:]), gens, self.comp.noise_scheduler.config.num_train_timesteps, dev,
                              shared=d.shared_noise)
        if batch.embeds_w is not None:
            cond = self._cached_cond(batch, drop)
        else:
            caps_w = ["" if dr else c for c, dr in zip(batch.captions, drop)]
            caps_l = caps_w if batch.captions_rejected is None else \
                ["" if dr else c for c, dr in zip(batch.captions_rejected, drop)]
            enc = lambda caps: encode_prompts(self.pipe, caps, dev, self.comp.kind,  # noqa: E731
                                              batch.original_size, batch.crop_top_left, self.cfg.data.resolution)
            cond_w = enc(caps_w)
            cond = cond_w.cat(cond_w if caps_l is caps_w else enc(caps_l))
        cond = Cond(cond.embeds.float(), None if cond.pooled is None else cond.pooled.float(),
                    None if cond.time_ids is None else cond.time_ids.float())
        if self.cfg.ppd is not None:  # PPD: the pair's user tokens after the text tokens
            from mmalign.diffusion.users import with_user_tokens

            e = torch.stack([self.user_embedding(u) for u in batch.user_ids]).to(dev)
            cond.embeds = with_user_tokens(cond.embeds, torch.cat([e, e]), self.unet)
        return x0, noise, t, cond

    def _cached_cond(self, batch: ImagePairBatch, drop: list[bool]) -> Cond:
        dev = self.acc.device
        keep = torch.tensor([not d for d in drop], device=dev)

        def pick(x, key):
            x = x.to(dev, torch.float32)
            if self.empty_text is None or key not in self.empty_text:
                return x
            e = self.empty_text[key].to(dev, torch.float32)
            return torch.where(keep.view(-1, *[1] * (x.dim() - 1)), x, e.expand_as(x))

        ew = pick(batch.embeds_w, "embeds")
        el = ew if batch.embeds_l is None else pick(batch.embeds_l, "embeds")
        pw = pl = tid = None
        if batch.pooled_w is not None:
            pw = pick(batch.pooled_w, "pooled")
            pl = pw if batch.pooled_l is None else pick(batch.pooled_l, "pooled")
            from mmalign.diffusion.scoring import sdxl_time_ids

            tid = sdxl_time_ids(batch.original_size.to(dev), batch.crop_top_left.to(dev), self.cfg.data.resolution)
        return Cond(ew, pw, tid).cat(Cond(el, pl, tid))

    @contextlib.contextmanager
    def _reference(self):
        from mmalign.diffusion.users import user_branch

        with torch.no_grad():
            if self.ref_kind == "copy":
                with user_branch(self.ref_unet, False):  # PPD: the reference is the base model
                    yield self.ref_unet
            elif self.ref_kind in ("peft", "precomputed"):
                lora = self.cfg.model.lora is not None
                if lora:
                    self.unet.disable_adapters()
                try:
                    with user_branch(self.unet, False):
                        yield self.unet
                finally:
                    if lora:
                        self.unet.enable_adapters()
            else:
                raise RuntimeError(self.ref_kind)

    def _ref_mse(self, x0, noise, t, cond, xt=None) -> Tensor:
        with self._reference() as ref, self.acc.autocast():
            return pair_mse(ref, self.comp.noise_scheduler, x0, noise, t, cond, xt)

    def _invert(self, x0, t, cond, gens) -> tuple[Tensor, Tensor]:
        """DDIM-InPO: (x_t, eps_hat) for the 2B samples by inverting with the current policy (no grad)."""
        from mmalign.diffusion.inversion import ddim_invert

        inv = self.cfg.inversion
        x = torch.cat([x0[:, 0], x0[:, 1]])
        with self.acc.autocast():
            return ddim_invert(self.unet, x, torch.cat([t, t]), cond.unet_kwargs(),
                               self.comp.noise_scheduler.alphas_cumprod, inv.steps, inv.eta, gens + gens, inv.exact_t)

    @torch.no_grad()
    def precompute(self, data, split: str, draws: int, batch_size: int = 16) -> Tensor:
        """Reference MSE for every (row, draw) with the initial model: ``[N, draws, 2]`` (winner, loser)."""
        table = torch.zeros(len(data), draws, 2)
        for k in range(draws):
            for lo in range(0, len(data), batch_size):
                batch = data.collate([data[i] for i in range(lo, min(len(data), lo + batch_size))])
                if len(batch) == 0:
                    continue
                batch.to(self.acc.device)
                gens = [self._generator(k, int(r), split) for r in batch.index]
                x0, noise, t, cond = self._inputs(batch, gens, split)
                mse = self._ref_mse(x0, noise, t, cond)
                w, l_ = mse.chunk(2)
                table[batch.index.cpu(), k] = torch.stack([w, l_], -1).cpu()
        return table

    def compute(self, batch: ImagePairBatch, step: int = 0, split: str = "train") -> StepOutput:
        gens = [self._generator(step, int(r), split) for r in batch.index]
        x0, noise, t, cond = self._inputs(batch, gens, split)
        xt = self._invert(x0, t, cond, gens) if self.cfg.inversion is not None else None
        mse = pair_mse(self.model, self.comp.noise_scheduler, x0, noise, t, cond, xt)
        if self.ref_kind == "precomputed":
            k = 0 if split == "eval" else step % self.cfg.data.noise_draws
            tab = self.ref_tables[split][batch.index.cpu(), k].to(mse.device)
            ref = torch.cat([tab[:, 0], tab[:, 1]])
        else:
            ref = self._ref_mse(x0, noise, t, cond, xt).float()
        mw, ml = mse.chunk(2)
        rw, rl = ref.chunk(2)
        extras = {}
        if self.running is not None:
            if split == "train":
                extras["running"] = self.running
            else:
                extras["shift"] = self.running.mean
        if batch.labels is not None:  # soft labels (RPO): y = P(image 0 preferred) -> per-pair smoothing 1 - y
            extras["label_smoothing"] = 1.0 - batch.labels.to(mw.device)
        loss, m = self.loss_fn(-mw, -ml, -rw, -rl, beta=0.5 * self.beta, **self.hp, **extras)
        m.update(model_mse_w=mw.detach(), model_mse_l=ml.detach(), ref_mse_w=rw.detach(), ref_mse_l=rl.detach())
        return StepOutput(loss, m)

    # ------------------------------------------------------------------ validation and export

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], steps: int | None = None,
               guidance: float | None = None, resolution: int | None = None, unet=None):
        v = self.cfg.validation
        res = resolution or v.resolution or self.cfg.data.resolution
        pipe = self.comp.pipeline(unet if unet is not None else self.unet)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        was = self.unet.training
        self.unet.eval()
        out = pipe(prompts, num_inference_steps=steps or v.num_inference_steps,
                   guidance_scale=guidance if guidance is not None else v.guidance_scale, height=res, width=res,
                   generator=gens, output_type="pil").images
        self.unet.train(was)
        return out

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        out = {}
        if self.eval_data is not None:
            sums = MetricSums()
            rows = list(range(self.acc.process_index, len(self.eval_data), self.acc.num_processes))
            bs = self.cfg.train.batch_size
            for lo in range(0, len(rows), bs):
                batch = self.eval_data.collate([self.eval_data[i] for i in rows[lo: lo + bs]])
                if len(batch) == 0:
                    continue
                batch.to(self.acc.device)
                with self.acc.autocast():
                    o = self.compute(batch, step, split="eval")
                sums.add(o.metrics, o.loss)
            red = (lambda t: self.acc.reduce(t.to(self.acc.device), reduction="sum").cpu()) \
                if self.acc.num_processes > 1 else None
            out.update(sums.means(red))
        v = self.cfg.validation
        if v.prompts and self.acc.is_main_process:
            prompts = [p for p in v.prompts for _ in range(v.images_per_prompt)]
            seeds = [v.seed + j for _ in v.prompts for j in range(v.images_per_prompt)]
            images = self.sample(prompts, seeds)
            self.samples_dir.mkdir(parents=True, exist_ok=True)
            grid = make_grid(images, cols=v.images_per_prompt * min(4, len(v.prompts)), labels=prompts)
            grid.save(self.samples_dir / f"step-{step:08d}.png")
            if self.scorer is not None:
                scores = self.scorer(images, prompts)
                out["reward"] = float(sum(scores) / len(scores))
                self._select(step, out["reward"])
            for tracker in self.acc.trackers:
                if tracker.name == "tensorboard":
                    import numpy as np

                    tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step,
                                              dataformats="NHWC")
        return out

    def _export_users(self, out: Path):
        """PPD: the user branch weights and the user embeddings (``load_user_branch`` reads them back)."""
        from safetensors.torch import save_file

        from mmalign.diffusion.users import UserAttnProcessor

        state = {f"tokens.{k}": v for k, v in self.unet.user_tokens.state_dict().items()}
        for name, proc in self.unet.attn_processors.items():
            if isinstance(proc, UserAttnProcessor):
                state.update({f"attn.{name}.{k}": v for k, v in proc.state_dict().items()})
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(out / "user_branch.safetensors"))
        save_file({f"user.{u}": e.contiguous() for u, e in self.user_emb.items()}, str(out / "user_embeddings.safetensors"))
        (out / "user_branch.json").write_text(json.dumps({"n_tokens": self.cfg.ppd.n_tokens, "scale": self.cfg.ppd.scale,
                                                          "users": sorted(self.user_emb)}))

    def _select(self, step: int, reward: float):
        """Reward-based checkpoint selection (RPO): export to <output_dir>/best on improvement, and stop
        after ``validation.patience`` evaluations without one."""
        v = self.cfg.validation
        if reward > self.best_reward:
            self.best_reward, self.best_step, self.evals_since_best = reward, step, 0
            if v.select_best:
                self.export(Path(self.cfg.train.output_dir) / "best", card={"step": step, "reward": round(reward, 5)})
        else:
            self.evals_since_best += 1
            if v.patience and self.evals_since_best >= v.patience:
                self.stop = True
                print(f"early stop at step {step}: no reward improvement in {v.patience} evaluations "
                      f"(best {self.best_reward:.4f} at step {self.best_step})", flush=True)

    def export(self, out_dir: str | Path, card: dict | None = None):
        """LoRA: ``pytorch_lora_weights.safetensors`` loadable by ``pipe.load_lora_weights(out_dir)``.
        Full: a diffusers pipeline folder (EMA weights if enabled). Plus a short model card."""
        if not self.acc.is_main_process:
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        params = self.trainable_parameters()
        if self.ema is not None:
            self.ema.store(params)
            self.ema.copy_to(params)
        try:
            if self.cfg.ppd is not None:
                self._export_users(out)
            pipe = self.comp.pipeline(self.unet)
            if self.cfg.model.lora is not None:
                from diffusers.utils import convert_state_dict_to_diffusers
                from peft.utils import get_peft_model_state_dict

                layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
                type(pipe).save_lora_weights(str(out), unet_lora_layers=layers)
            else:
                pipe.save_pretrained(str(out))
                self.comp.noise_scheduler.save_pretrained(str(out / "scheduler"))
        finally:
            if self.ema is not None:
                self.ema.restore(params)
        write_model_card(out, self.cfg, card or {})


def write_model_card(out: Path, cfg: DiffusionConfig, metrics: dict):
    base = cfg.model.name_or_path or f"tiny random {cfg.model.kind} (from config)"
    kind = "LoRA adapter" if cfg.model.lora else "full UNet fine-tune"
    lines = [
        "---", "library_name: diffusers", "tags: [mmalign, diffusion-dpo, text-to-image]", "---", "",
        f"# {cfg.loss.name} fine-tune of {base}", "",
        f"A {kind} trained with mmalign's `{cfg.loss.name}` preference loss (Diffusion-DPO, Wallace et al. 2023).", "",
        f"- base model: `{base}` ({cfg.model.kind})",
        f"- data: `{cfg.data.train}` at {cfg.data.resolution}px",
        f"- beta: {cfg.loss.params.get('beta')} (Salesforce convention), steps: {cfg.train.max_steps}, "
        f"global batch: {cfg.train.batch_size} x {cfg.train.grad_accum} x processes",
        f"- reference: {cfg.model.reference}, optimizer: {cfg.train.optimizer}, lr: {cfg.train.lr} "
        f"(scale_lr={cfg.train.scale_lr})",
    ]
    if metrics:
        lines += ["", "## Metrics", ""] + [f"- {k}: {v}" for k, v in metrics.items()]
    if cfg.model.lora:
        lines += ["", "## Use", "", "```python", "pipe.load_lora_weights(PATH_TO_THIS_FOLDER)", "```"]
    (out / "README.md").write_text("\n".join(lines) + "\n")


def run(cfg: DiffusionConfig, accelerator=None, components: Components | None = None, scorer=None):
    from accelerate.utils import set_seed

    from mmalign.config import to_dict

    acc = accelerator or make_accelerator(cfg.train)
    set_seed(cfg.train.seed)
    recipe = DiffusionRecipe(cfg, acc, components)
    if scorer is not None:  # else keep the one validation.reward configured
        recipe.scorer = scorer
    result = train(recipe, cfg.train, acc, config=to_dict(cfg))
    final = eval_summary(result, acc)
    recipe.export(Path(cfg.train.output_dir) / "final", card=final)
    if acc.is_main_process:
        with open(Path(cfg.train.output_dir) / "final" / "summary.json", "w") as f:
            json.dump({"step": result.step, "eval": result.eval_history, "skipped_steps": result.skipped_steps}, f)
    result.recipe = recipe
    return result
