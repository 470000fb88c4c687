"""Recipe ``diffusion``: Diffusion-DPO (any pairwise loss of the core) for every model family -- wiring only.

Who owns what: ``mmalign.diffusion.models`` builds the components, ``mmalign.diffusion.families`` turns a
batch into conditioning, latents, a shared noise/t draw and per-sample scores ``-mse`` (SD / SDXL UNets,
SD3 / Flux flow matching), ``mmalign.train.reference`` is the reference model, ``diffusion.validation``
samples grids and selects checkpoints, ``diffusion.export`` writes LoRA / full exports. Per step and pair
one generator keyed by (seed, step, row) draws the flip, the caption dropout, the noise and t (and the VAE
posterior sample) -- all shared by winner and loser -- and the loss core gets ``BETA_SCALE`` * beta.
"""
from __future__ import annotations

import importlib.util  # importlib.import_module too
import shutil
from pathlib import Path

import torch

from mmalign.diffusion import export as exporter
from mmalign.diffusion.cache import HALF, CachedPairs, build_cache, cache_dtype, cache_options, cache_path
from mmalign.diffusion.cache import caches_complete, compact_fill, load_or_compute_table, precompute_table
from mmalign.diffusion.cache import ReferenceRecord, reference_table_path, write_empty
from mmalign.diffusion.data import ImagePairBatch, PreferencePairs
from mmalign.diffusion.families import BETA_SCALE, family_for
from mmalign.diffusion.fill import CacheFill, MarkUnreadable
from mmalign.diffusion.options import DEFAULT_BETA
from mmalign.diffusion.inputs import PairInputs, ppd_user_tokens
from mmalign.diffusion.inversion import ddim_invert
from mmalign.diffusion.online import DiffusionRounds
from mmalign.diffusion.rl import RL_KINDS
from mmalign.diffusion.storage import STORAGE_DTYPES, frozen_convs_save_no_input, storable, store_frozen
from mmalign.diffusion.models import Components, load_components, place_frozen, tiny_components
from mmalign.diffusion.users import ClipPreferenceEncoder, add_user_branch, embed_users, user_branch
from mmalign.eval.sampling import sample_images
from mmalign.models.checkpointing import auto_checkpointing
from mmalign.models.lora import fuse_lora_layers
from mmalign.diffusion.validation import Validator, reward_scorer
from mmalign.losses import RunningMoments
from mmalign.train.checkpoint import sharded_engine
from mmalign.train.reference import Reference, resolve_kind
from mmalign.rewards import load_reward

from .guard import Guard
from .loop import StepOutput
from .online import OnlineRounds, weight_keeper
from .recipe import RecipeBase, run_recipe
from .sections import DiffusionConfig

Tensor = torch.Tensor


def frozen_dtype(cfg: DiffusionConfig) -> torch.dtype:
    if cfg.model.frozen_dtype != "auto":
        return getattr(torch, cfg.model.frozen_dtype)
    return HALF.get(cfg.train.mixed_precision, torch.float32)


def build_components(cfg: DiffusionConfig, dtype: torch.dtype, frozen: bool = True) -> Components:
    """``frozen=False``: leave the VAE and text encoders on disk (read later when something needs them)."""
    m = cfg.model
    if m.tiny is not None:
        tiny = dict(m.tiny)
        if m.prediction_type != "auto":
            tiny["prediction_type"] = m.prediction_type
        return tiny_components(m.kind, **tiny)
    return load_components(m.kind, m.name_or_path, vae=m.vae, prediction_type=m.prediction_type, dtype=dtype,
                           frozen=frozen)


def set_attention(model, backend: str, unet: bool):
    """``sdpa`` (PyTorch scaled-dot-product attention; the flow transformers' default already) or ``xformers``."""
    if backend == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise ImportError("model.attention=xformers needs xformers (pip install 'mmalign[gpu]', CUDA only); "
                              "the default model.attention=sdpa needs nothing")
        model.enable_xformers_memory_efficient_attention()
    elif unet:
        from diffusers.models.attention_processor import AttnProcessor2_0

        model.set_attn_processor(AttnProcessor2_0())


class DiffusionRecipe(RecipeBase):
    eval_mode = False  # see RecipeBase.eval_mode
    rounds_cls = DiffusionRounds
    """the round source of online runs (pairs for DPO; ``diffusion_rl`` sets the group-RL one)"""

    def __init__(self, cfg: DiffusionConfig, accelerator, components: Components | None = None, scorer=None):
        self.cfg, self.acc = cfg, accelerator
        self.loss_fn, self.hp = cfg.loss.fn, dict(cfg.loss.params)
        self.beta = float(self.hp.pop("beta", DEFAULT_BETA))
        dev, self.dtype = accelerator.device, frozen_dtype(cfg)
        d = cfg.data
        # online runs sample their pairs round by round (mmalign.diffusion.online): no pair data to read
        self.train_data = self._pairs(d.train, d.split, d.max_examples) if cfg.online is None else None
        self.eval_data = self._pairs(d.eval, d.eval_split, d.max_eval_examples) if d.eval else None
        if d.cache_dir:
            self._compact_fills()
        # with a finished latent + text cache the step never runs the VAE or the text encoders: leave them on
        # disk (SDXL: 0.9B parameters, Flux: T5-XXL's 4.7B); validation and full exports read them when needed
        comp = components or build_components(cfg, self.dtype, frozen=not caches_complete(
            cfg, {"train": self.train_data, "eval": self.eval_data}, self.dtype))
        self.comp = comp
        f = cfg.flow
        self.family = family_for(comp, timestep_sampling=f.timestep_sampling, logit_mean=f.logit_mean,
                                 logit_std=f.logit_std, mode_scale=f.mode_scale, guidance=f.guidance,
                                 max_sequence_length=f.max_sequence_length)
        unet = self._build_denoiser(comp.denoiser)
        self.unet = self.policy = unet  # unwrapped handle (the UNet or flow transformer)
        self.compiled = torch.compile(unet) if cfg.model.compile else None
        self.model = self.compiled if self.compiled is not None else unet  # (a compiled module has no truth value)
        self.pipe = comp.pipeline(unet)
        self.inputs = PairInputs(self.family, self.pipe, comp.vae, cfg.data, cfg.train.seed, dev, self.dtype,
                                 ppd_user_tokens(self.user_emb, unet) if cfg.ppd is not None else None)
        if d.cache_dir:
            self._use_cache()
        self._build_reference()
        self.running = RunningMoments() if "running" in self.loss_fn.uses else None
        if d.label_mode == "soft" and "label_smoothing" in self.hp:
            raise ValueError("data.label_mode=soft sets label_smoothing per pair; remove loss.label_smoothing")
        self.validator = Validator(cfg.validation, d.resolution, cfg.train.output_dir, self.sample, self.export,
                                   scorer or reward_scorer(cfg.validation, accelerator.device))
        if cfg.online is not None:
            o = cfg.online
            self.online = OnlineRounds(self.rounds_cls(self, cfg), o.rounds, o.steps_per_round,
                                       cfg.train.batch_size * accelerator.num_processes, cfg.train.output_dir,
                                       accelerator, Guard(patience=o.guard), weight_keeper(self))
        if self.ref_kind == "precomputed":
            self._precompute_reference()

    def _build_denoiser(self, unet):
        """The trained module, in this order: attention backend; the frozen VAE / text encoders placed; LoRA
        adapters on a frozen base (``_add_lora``) or every weight trainable; the PPD user branch; gradient
        checkpointing; device and memory layout."""
        cfg = self.cfg
        set_attention(unet, cfg.model.attention, unet=not self.family.flow)
        place_frozen(self.comp.frozen_modules(), self.acc.device, self.dtype)
        if cfg.model.lora is not None:
            self._add_lora(unet)
        else:
            unet.requires_grad_(True)
        self.user_emb: dict = {}
        if cfg.ppd is not None:
            self._setup_ppd(unet)
        ckpt = cfg.model.gradient_checkpointing
        # auto: decided at the first trained forward; on under torch.compile (the deciding hook would break its
        # graph) and FSDP / DeepSpeed (sharded weights: memory is what they are for)
        if ckpt == "auto" and self._eager_unsharded():
            auto_checkpointing(unet, unet.enable_gradient_checkpointing, unet.disable_gradient_checkpointing,
                               self.acc.print, lever=self._storage_lever(unet))
        elif ckpt:
            unet.enable_gradient_checkpointing()
        unet.to(self.acc.device)
        if cfg.model.channels_last and not self.family.flow:
            unet.to(memory_format=torch.channels_last)
        return unet

    def _storage_lever(self, unet):
        """For auto checkpointing's report: the next lower model.storage_dtype of a LoRA run (fp32 frozen weights
        -> bfloat16, 16-bit -> float8_e4m3fn) and the bytes it would free; None where there is none."""
        if self.cfg.model.lora is None or self.storage is not None:
            return None
        name = {4: "bfloat16", 2: "float8_e4m3fn"}.get(self.dtype.itemsize)
        frozen = sum(m.weight.numel() * m.weight.element_size() for m in unet.modules() if storable(m))
        return None if name is None or not frozen else (f"model.storage_dtype={name}", frozen // 2)

    def _add_lora(self, unet):
        """LoRA adapters (fp32) on the frozen base, which is kept in model.frozen_dtype -- the diffusers scripts'
        way -- or stored lower still (model.storage_dtype, upcast per layer: mmalign.diffusion.storage)."""
        from diffusers.training_utils import cast_training_params  # diffusers: loaded with the model already
        from peft import LoraConfig

        lo = self.cfg.model.lora
        unet.requires_grad_(False)
        if self.dtype != torch.float32:
            unet.to(dtype=self.dtype)
        unet.add_adapter(LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                                    init_lora_weights="gaussian" if lo.init == "gaussian" else True,
                                    target_modules=lo.target_modules or list(self.family.lora_targets)))
        cast_training_params(unet, torch.float32)  # trainable LoRA weights stay fp32 (diffusers' helper)
        fuse_lora_layers(unet)  # the same bits as peft's forward, fewer dispatched ops per layer
        if self.storage is not None:
            store_frozen(unet, self.storage, self.dtype)
        elif self._eager_unsharded():  # compile's partitioner drops the save itself; FSDP / DeepSpeed: left alone
            frozen_convs_save_no_input(unet)  # the same bits; no saved input the frozen conv's backward never reads

    @property
    def storage(self) -> torch.dtype | None:
        """model.storage_dtype resolved: auto = bf16 where a LoRA run's frozen base would be fp32, else none."""
        name = self.cfg.model.storage_dtype
        if name == "auto":
            return torch.bfloat16 if self.cfg.model.lora is not None and self.dtype == torch.float32 else None
        return None if name is None else STORAGE_DTYPES[name]

    def _eager_unsharded(self) -> bool:
        """Neither model.compile nor FSDP / DeepSpeed: where this recipe adds its own hooks and forwards to the
        denoiser (auto checkpointing's deciding hook, the frozen convs' forward)."""
        return not (self.cfg.model.compile or sharded_engine(self.acc))

    def _use_cache(self):
        """Read latents + text embeddings from data.cache_dir: built before the first step, or filled by the steps
        (``cache_build``); once every split reads a complete cache the VAE and text encoders are freed."""
        cfg, filling = self.cfg, False
        for split in ("train", "eval"):
            data = self.train_data if split == "train" else self.eval_data
            if data is None:
                continue
            path = cache_path(cfg, split, self.dtype)
            if self._fill_while_training(split, data):
                data, filling = self._filling(data, path, split), True
            else:
                data = self._cached(data, path)
            setattr(self, f"{split}_data", data)
        if not filling and self.comp.release_frozen():
            self.pipe = self.inputs.pipe = self.inputs.vae = None

    def _fill_while_training(self, split: str, data) -> bool:
        """data.cache_build, auto resolved: fill while training when the run reads each training pair at most
        once (the cache would be paid for and never read) and no reference table needs every pair first."""
        cfg, mode = self.cfg, self.cfg.data.cache_build
        if caches_complete(cfg, {split: data}, self.dtype):
            return False
        if mode != "auto":
            return mode == "while_training"
        t = cfg.train
        reads = t.max_steps * t.batch_size * t.grad_accum * self.acc.num_processes
        return split == "train" and reads <= len(data) and self.cfg.model.reference != "precomputed"

    def _filling(self, pairs: PreferencePairs, path: Path, split: str) -> MarkUnreadable:
        """Pixels in, and a ``CacheFill`` the steps read from and add to; the empty prompt's conditioning is
        encoded up front (caption dropout, Flux's text ids)."""
        if self.acc.is_main_process:
            path.mkdir(parents=True, exist_ok=True)
            if not (path / "empty.safetensors").exists():
                write_empty(path, self.inputs.encode_text, cache_dtype(self.cfg))
        self.acc.wait_for_everyone()
        self.inputs.fills[split] = CacheFill(path, cache_dtype(self.cfg), rank=self.acc.process_index)
        self.inputs.empty = CachedPairs.read_empty(path)
        return MarkUnreadable(pairs)

    def _compact_fills(self):
        """A cache the steps of earlier runs filled completely becomes a shard cache before anything loads."""
        if self.acc.is_main_process:
            for split, data in (("train", self.train_data), ("eval", self.eval_data)):
                if data is not None:
                    compact_fill(data, cache_path(self.cfg, split, self.dtype),
                                 **cache_options(self.cfg.data, cache_dtype(self.cfg)))
        self.acc.wait_for_everyone()

    def flush_fills(self):
        """Write what the steps encoded (``data.cache_build=while_training``) and the reference scores they
        computed (``model.reference_record``) to the cache folder."""
        for fill in self.inputs.fills.values():
            fill.flush()
        for rec in getattr(self, "records", {}).values():
            rec.flush()

    def on_step_end(self, step: int, applied: bool = True) -> None:
        super().on_step_end(step, applied)
        if step >= self.cfg.train.max_steps:
            self.flush_fills()

    def extra_state(self) -> dict:
        self.flush_fills()  # every checkpoint (the one an interrupt writes too) keeps what the steps encoded
        return super().extra_state()

    def _build_reference(self):
        """The reference (adapters off, a frozen copy, or precomputed scores; mmalign.train.reference) and the
        EMA of the trained weights."""
        cfg = self.cfg
        self.ref_kind = resolve_kind(cfg.model.reference, cfg.model.lora is not None, self.loss_fn.needs_reference)
        self.reference = Reference(self.ref_kind, self.unet, mode="policy", dtype=self.dtype,
                                   offload=cfg.model.reference_offload,
                                   detach=(lambda m: user_branch(m, False)) if cfg.ppd is not None else None)
        self.records = self._reference_records()
        self.ema = None
        if cfg.model.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.trainable_parameters(), decay=cfg.model.ema_decay, foreach=True)

    def _reference_records(self) -> dict[str, ReferenceRecord]:
        """model.reference_record: per split, the reference scores earlier steps and runs computed for the same
        draws. Not where the reference depends on more than the frozen base and the keyed draws: DDIM-InPO's
        inversion by the current policy, PPD's user branch, online rounds' fresh samples."""
        cfg = self.cfg
        if not (cfg.model.reference_record and cfg.data.cache_dir and self.ref_kind in ("peft", "copy")
                and cfg.inversion is None and cfg.ppd is None and cfg.online is None):
            return {}
        recs = {split: ReferenceRecord(reference_table_path(cfg, split, cfg.data.noise_draws if split == "train"
                                                            else 1), self.acc.process_index)
                for split in ("train", "eval")}
        n = sum(r.known for r in recs.values())
        if n:
            self.acc.print(f"reference scores of earlier steps with the same draws: {n} pairs "
                           f"({cfg.data.cache_dir}/reference): their reference forward is skipped")
        return recs

    def _reference(self, x0, noise, t, cond, xt, batch: ImagePairBatch, step: int, split: str) -> Tensor:
        """The reference's per-sample MSE ``[2B]``: from the record when it has this batch's draws, else computed
        (and recorded), keyed by the draw the step uses (eval's does not depend on the step)."""
        rec = self.records.get(split)
        key = self.inputs.draw_index(step, split)
        ref = rec.lookup(key, batch.index) if rec is not None else None
        if ref is None:
            ref = self._ref_mse(x0, noise, t, cond, xt).float()
            if rec is not None:
                rec.add(key, batch.index, ref)
        return ref

    def _precompute_reference(self):
        """Reference scores of every pair, kept in data.cache_dir: later runs on the same data reuse them."""
        d = self.cfg.data
        for split, data, k in (("train", self.train_data, d.noise_draws), ("eval", self.eval_data, 1)):
            if data is not None:
                tab = load_or_compute_table(reference_table_path(self.cfg, split, k),
                                            lambda: self.precompute(data, split, k), self.acc.is_main_process)
                self.reference.store(split, {"mse": tab})

    @property
    def stop(self) -> bool:  # the loop's early-stopping flag (reward-based checkpoint selection)
        return self.validator.stop

    def _setup_ppd(self, unet):
        """Embed every user from their first examples, then add the user branch to the UNet."""

        p, d = self.cfg.ppd, self.cfg.data
        enc = ClipPreferenceEncoder(load_reward(p.encoder, model=p.encoder_model, device=self.acc.device,
                                                tiny=p.encoder_tiny).backbone)
        self.user_emb.update(embed_users(self._pairs(d.train, d.split, d.max_examples), enc, p.examples_per_user))
        add_user_branch(unet, next(iter(self.user_emb.values())).numel(), p.n_tokens, p.scale)

    # ------------------------------------------------------------------ data

    def _pairs(self, source, split, max_examples):
        d = self.cfg.data
        return PreferencePairs(source, split, d.resolution, d.center_crop, d.drop_ties, d.columns, max_examples,
                               seed=self.cfg.train.seed, dual_captions=d.dual_captions,
                               soft_labels=d.label_mode == "soft", with_user=self.cfg.ppd is not None,
                               allow_outside_root=d.allow_outside_root)

    def _cached(self, pairs: PreferencePairs, path: Path) -> CachedPairs:
        if self.acc.is_main_process:
            build_cache(pairs, self.inputs.encode_pixels, path, encode_text=self.inputs.encode_text,
                        progress=self.cfg.train.progress, **cache_options(self.cfg.data, cache_dtype(self.cfg)))
            shutil.rmtree(path / "fill", ignore_errors=True)  # a fill of earlier single passes: superseded
        self.acc.wait_for_everyone()
        cached = CachedPairs(path, pairs)
        self.inputs.empty = cached.empty
        return cached

    # ------------------------------------------------------------------ bookkeeping

    def describe(self) -> str:
        n = sum(p.numel() for p in self.unet.parameters())
        t = sum(p.numel() for p in self.trainable_parameters())
        name = "transformer" if self.family.flow else "UNet"
        o = self.cfg.online
        data = self.train_data.describe() if o is None else (
            f"online: {o.rounds} rounds x {o.steps_per_round} steps, {o.samples} images x "
            f"{len(self.online.source.prompts)} prompts per round, reward {o.reward}")
        return (f"diffusion/{self.cfg.loss.name} {self.comp.kind} ({self.comp.prediction_type}) | {name} {n / 1e6:.2f}M "
                f"({t / 1e6:.3f}M trainable{', LoRA' if self.cfg.model.lora else ''}{self._stored_note()}) | "
                f"reference {self.ref_kind} | "
                f"beta {self.beta:g} | {data}")

    def _stored_note(self) -> str:
        """The header's note where the frozen base is stored below its compute dtype (model.storage_dtype)."""
        if self.storage is None:
            return ""
        low, compute = str(self.storage).removeprefix("torch."), str(self.dtype).removeprefix("torch.")
        return f", frozen base stored {low}, computed {compute}"

    # ------------------------------------------------------------------ inputs and scores

    def _ref_mse(self, x0, noise, t, cond, xt=None) -> Tensor:
        with self.reference.context() as ref, self.acc.autocast():
            return self.family.pair_mse(ref, x0, noise, t, cond, xt)

    def _invert(self, x0, t, cond, gens) -> tuple[Tensor, Tensor]:
        """DDIM-InPO: (x_t, eps_hat) for the 2B samples by inverting with the current policy (no grad)."""

        inv = self.cfg.inversion
        x = torch.cat([x0[:, 0], x0[:, 1]])
        with self.acc.autocast():
            return ddim_invert(self.unet, x, torch.cat([t, t]), cond.unet_kwargs(),
                               self.comp.noise_scheduler.alphas_cumprod, inv.steps, inv.eta, gens + gens, inv.exact_t)

    @torch.no_grad()
    def precompute(self, data, split: str, draws: int, batch_size: int = 16) -> Tensor:
        """Reference MSE for every (row, draw) with the initial model: ``[N, draws, 2]`` (winner, loser)."""
        return precompute_table(data, self.inputs, self._ref_mse, split, draws, self.acc.device, batch_size)

    def compute(self, batch: ImagePairBatch, step: int = 0, split: str = "train") -> StepOutput:
        gens = self.inputs.generators(batch, step, split)
        x0, noise, t, cond = self.inputs.build(batch, gens, split)
        xt = self._invert(x0, t, cond, gens) if self.cfg.inversion is not None else None
        mse = self.family.pair_mse(self.model, x0, noise, t, cond, xt)
        if self.ref_kind == "precomputed":
            tab = self.reference.lookup(split, batch.index, self.inputs.draw_index(step, split))["mse"].to(mse.device)
            ref = torch.cat([tab[:, 0], tab[:, 1]])
        else:
            ref = self._reference(x0, noise, t, cond, xt, batch, step, split).to(mse.device)
        mw, ml = mse.chunk(2)
        rw, rl = ref.chunk(2)
        extras = {}
        if self.running is not None:
            extras["running" if split == "train" else "shift"] = self.running if split == "train" else self.running.mean
        if batch.labels is not None:  # soft labels (RPO): y = P(image 0 preferred) -> per-pair smoothing 1 - y
            extras["label_smoothing"] = 1.0 - batch.labels.to(mw.device)
        loss, m = self.loss_fn(-mw, -ml, -rw, -rl, beta=BETA_SCALE * self.beta, **self.hp, **extras)
        m.update(model_mse_w=mw.detach(), model_mse_l=ml.detach(), ref_mse_w=rw.detach(), ref_mse_l=rl.detach())
        return StepOutput(loss, m)

    # ------------------------------------------------------------------ evaluation, sampling, export

    @torch.no_grad()
    def sample(self, prompts: list[str], seeds: list[int], steps: int | None = None,
               guidance: float | None = None, resolution: int | None = None, unet=None):
        v = self.cfg.validation
        place_frozen(self.comp.load_frozen(), self.acc.device, self.dtype)  # on disk while training on the cache
        pipe = self.comp.pipeline(unet if unet is not None else self.unet)
        was = self.unet.training
        self.unet.eval()
        try:
            return sample_images(pipe, prompts, seeds, steps or v.num_inference_steps,
                                 guidance if guidance is not None else v.guidance_scale,
                                 resolution or v.resolution or self.cfg.data.resolution)
        finally:
            self.unet.train(was)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        out = self.evaluate_pairs(self.eval_data, step)
        if "eval" in self.records:
            self.records["eval"].flush()
        if self.validator.enabled and self.acc.is_main_process:
            out.update(self.validator.run(step, self.acc.trackers))
        return out

    def export(self, out_dir: str | Path, card: dict | None = None):
        """LoRA (``pipe.load_lora_weights(out_dir)``) or a full pipeline folder, plus a model card."""
        if self.acc.is_main_process:
            if self.cfg.model.lora is None:
                self.comp.load_frozen()  # a full pipeline folder includes them
            ppd = self.cfg.ppd
            exporter.export(out_dir, self.comp, self.family, self.unet, self.model_card(), self.ema,
                            None if ppd is None else (ppd.n_tokens, ppd.scale), self.user_emb, card)

    def model_card(self) -> exporter.ModelCard:
        c = self.cfg
        return exporter.ModelCard(
            base=c.model.name_or_path or f"tiny random {c.model.kind} (from config)", kind=c.model.kind,
            lora=c.model.lora is not None, loss=c.loss.name, data=c.data.train, resolution=c.data.resolution,
            beta=c.loss.params.get("beta"), steps=c.train.max_steps, batch_size=c.train.batch_size,
            grad_accum=c.train.grad_accum, reference=c.model.reference, optimizer=c.train.optimizer, lr=c.train.lr,
            scale_lr=c.train.scale_lr)


# group RL (grpo, nft, awm) subclasses this recipe, so it is found by name -- as the CLI finds its commands and a
# config its runner -- not imported (that would be an import circle)
RL_RECIPE = "mmalign.train.diffusion_rl:DiffusionRLRecipe"


def recipe_class(cfg: DiffusionConfig) -> type:
    """``DiffusionRecipe`` for pairwise losses (offline or online pairs), ``DiffusionRLRecipe`` for group RL."""
    if cfg.loss.fn.kind not in RL_KINDS:
        return DiffusionRecipe
    module, name = RL_RECIPE.split(":")
    return getattr(importlib.import_module(module), name)


def run(cfg: DiffusionConfig, accelerator=None, components: Components | None = None, scorer=None):
    """Train, export ``final`` (+ summary.json); ``scorer(images, prompts)`` replaces validation.reward."""
    return run_recipe(recipe_class(cfg), cfg, accelerator, summary=True, components=components, scorer=scorer)
