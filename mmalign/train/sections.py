"""Typed config sections shared by every recipe, and one dataclass per recipe (``RECIPES``).

Free of model-library imports (diffusers, transformers, peft): binding a config imports torch through the loss
registry (loss names are checked against ``LOSSES``) and nothing heavier, so loading one (and the test that
loads every shipped config) takes under a second; each recipe names its runner as ``"module:function"``.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from mmalign.config import ConfigError, config_from_dict, not_in, read_config
from mmalign.diffusion.options import DEFAULT_BETA, PairDrawOptions, ValidationOptions
from mmalign.losses import LOSSES
from mmalign.registry import Registry

RECIPES: Registry = Registry("recipe")


def load_config(path, overrides: list[str] | None = None):
    """Read, inherit, override and bind a recipe config; returns the recipe's dataclass instance."""
    return config_from_dict(read_config(path, overrides), RECIPES)


@dataclass(kw_only=True)
class LossSection:
    """``loss: {name: dpo, beta: 0.1, ...}``: the name picks ``LOSSES[name]``; every other key is a
    keyword hyper-parameter of that function, checked against its signature."""

    name: str = "dpo"
    """the LOSSES entry (``mmalign losses`` lists them with their equations)"""
    params: dict[str, Any] = field(default_factory=dict)
    """its keyword hyper-parameters, written beside name (``loss: {name: dpo, beta: 0.1}``)"""

    @classmethod
    def from_dict(cls, value, path="loss"):
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping with 'name', got {value!r}")
        value = dict(value)
        name = value.pop("name", "dpo")
        params = dict(value.pop("params", {}) or {})
        params.update(value)
        obj = cls(name=name, params=params)
        obj.validate(path)
        return obj

    def to_dict(self):
        return {"name": self.name, **self.params}

    @property
    def fn(self):
        return LOSSES[self.name]

    def validate(self, path="loss"):
        try:
            fn = self.fn
        except KeyError as e:
            raise ConfigError(f"{path}.name: {e.args[0]}") from None
        sig = inspect.signature(fn)
        allowed = {p.name for p in sig.parameters.values() if p.kind == p.KEYWORD_ONLY}
        supplied = set(fn.supplied)  # inputs the recipe supplies itself (declared by the loss) are not hyper-parameters
        bad = sorted(set(self.params) - (allowed - supplied))
        if bad:
            raise ConfigError(f"{path}: loss {self.name!r} has no hyper-parameter(s) {bad}; "
                              f"it takes {sorted(allowed - supplied)}")
        for k, v in self.params.items():
            default = sig.parameters[k].default
            if isinstance(default, bool):
                ok = isinstance(v, bool)
            elif isinstance(default, (int, float)):
                if isinstance(v, str):
                    try:
                        v = self.params[k] = float(v)  # YAML reads 1e-3 (no dot) as a string
                    except ValueError:
                        pass
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            elif isinstance(default, str):
                ok = isinstance(v, str)
            else:
                ok = True
            if not ok:
                raise ConfigError(f"{path}.{k}: expected {type(default).__name__} like {default!r}, got {v!r}")
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{path}.{k}: must be a finite number, got {v}")
        beta = self.params.get("beta")
        if isinstance(beta, (int, float)) and not isinstance(beta, bool) and beta <= 0:
            raise ConfigError(f"{path}.beta must be > 0, got {beta} (a negative beta trains the rejected sample "
                              "up; zero trains nothing)")


def check_loss_and_batching(loss: "LossSection", train: "TrainSection"):
    """Losses whose value for a row depends on the other rows of its batch cannot be split into
    micro-batches without changing the gradient: refuse instead of silently training something else."""
    fn = loss.fn
    if fn.batch_dependent and train.grad_accum > 1:
        raise ConfigError(f"loss {loss.name!r} sorts within its batch (batch-dependent), so gradient accumulation "
                          f"would change it: set train.grad_accum=1 and raise train.batch_size instead "
                          f"(got grad_accum={train.grad_accum})")
    if "kl" in fn.uses and train.batch_size * train.grad_accum < 2:
        raise ConfigError(f"loss {loss.name!r} estimates its KL reference point from mismatched pairs of a step: "
                          "it needs train.batch_size x train.grad_accum >= 2")


@dataclass(kw_only=True)
class LoraSection:
    """peft LoRA; ``r = alpha`` with gaussian init is the diffusers DPO default."""

    r: int = 8
    """LoRA rank"""
    alpha: int = 8
    """LoRA alpha: the adapter's output is scaled by alpha / r (saved with the export, so it loads at this strength)"""
    dropout: float = 0.0
    """dropout on the LoRA input (0: the diffusers and TRL defaults)"""
    target_modules: Optional[list[str]] = None
    """module names to adapt; null = the recipe's default (attention projections)"""
    init: Literal["gaussian", "default"] = "gaussian"
    """gaussian (the diffusers DPO scripts) or peft's default (B = 0: the adapter starts as the identity)"""


@dataclass(kw_only=True)
class TrainSection:
    output_dir: str = "runs/default"
    """checkpoints, metrics.jsonl, validation samples, online rounds and the final export go here"""
    max_steps: int = 100
    """optimiser steps (online runs: rounds x steps_per_round, set for you)"""
    batch_size: int = 8
    """micro-batch per process: pairs (or lists / samples for unpaired and listwise losses)"""
    grad_accum: int = 1
    """micro-batches per optimiser step"""
    lr: float = 1e-5
    """learning rate (before scale_lr)"""
    scale_lr: bool = False
    """lr_effective = lr * global batch (batch_size * grad_accum * processes), the Diffusion-DPO rule"""
    weight_decay: float = 0.0
    """AdamW / Adafactor weight decay"""
    optimizer: Literal["adamw", "adamw8bit", "adafactor", "sgd"] = "adamw"
    """adamw, adamw8bit (bitsandbytes, the [gpu] extra), adafactor or sgd"""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's (beta1, beta2)"""
    scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """learning-rate schedule after the warm-up"""
    warmup_steps: int = 0
    """linear warm-up steps"""
    max_grad_norm: Optional[float] = 1.0
    """clip the global gradient norm to this (null: no clipping; a non-finite gradient is still caught)"""
    seed: int = 0
    """data order, noise and every other draw derive from it (keyed per step and row)"""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """no, fp16 or bf16 autocast (accelerate); frozen weights follow model.frozen_dtype"""
    nan_policy: Literal["error", "skip"] = "error"
    """non-finite loss: 'error' stops with the step and rows named; 'skip' drops the step and counts it"""
    max_skipped_steps: int = 10
    """stop when more steps than this were skipped (non-finite loss or gradient, or no readable row)"""
    max_unreadable_fraction: float = 0.5
    """stop when more than this fraction of the rows read so far could not be read (corrupt images)"""
    log_every: int = 10
    """write metrics.jsonl / tensorboard every this many steps"""
    eval_every: int = 0
    """evaluate (eval data, validation grids, rewards) every this many steps; 0 = never (online runs also evaluate after
    every round)"""
    save_every: int = 0
    """write a checkpoint every this many steps (0: only when interrupted)"""
    keep_checkpoints: int = 2
    """keep this many checkpoints (the one latest names is always kept); 0 = all"""
    resume: Optional[str] = None
    """'latest', a checkpoint directory, or 'auto' (latest if a checkpoint exists, else start fresh: for
    pre-emptible jobs that relaunch the same command)"""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """tensorboard, jsonl (metrics.jsonl only), or any accelerate tracker (wandb, ...)"""
    num_workers: int = 0
    """DataLoader worker processes"""
    progress: bool = True
    """show a progress bar"""

    def validate(self):
        for k in ("max_steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, k) < 1:
                raise ConfigError(f"train.{k} must be >= 1, got {getattr(self, k)}")
        for k in ("seed", "eval_every", "save_every", "keep_checkpoints", "warmup_steps", "max_skipped_steps",
                  "num_workers"):
            if getattr(self, k) < 0:
                raise ConfigError(f"train.{k} must be >= 0, got {getattr(self, k)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"train.lr must be a finite number > 0, got {self.lr}")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ConfigError(f"train.max_grad_norm must be a finite number > 0 (or null), got {self.max_grad_norm}")
        if not 0.0 <= self.max_unreadable_fraction <= 1.0:
            raise ConfigError(f"train.max_unreadable_fraction must be in [0, 1], got {self.max_unreadable_fraction}")


@dataclass(kw_only=True)
class ModelSource:
    """Where a model comes from, shared by every recipe: exactly one of a hub id / local folder
    (``from_pretrained``) or a tiny random model built from a config (tests, demos)."""

    name_or_path: Optional[str] = None
    """hub id or local directory"""
    tiny: Optional[dict[str, Any]] = None
    """build a tiny random model from a config instead (what the keys mean depends on the recipe)"""

    def validate(self):
        if (self.name_or_path is None) == (self.tiny is None):
            raise ConfigError("model: set exactly one of name_or_path or tiny")


@dataclass(kw_only=True)
class PolicySource(ModelSource):
    """A policy trained against a reference model: LoRA or full, and which reference (``mmalign.train.reference``)."""

    lora: Optional[LoraSection] = not_in("reference", default=None)
    """train LoRA adapters instead of every weight (null: full fine-tuning)"""
    reference: Literal["auto", "copy", "peft", "precomputed"] = not_in("reference", default="auto")
    """auto = peft (adapters disabled) with LoRA, else a frozen copy"""
    gradient_checkpointing: Union[bool, Literal["auto"]] = not_in("reference", default=False)
    """recompute activations in the backward pass (less memory, ~30 % more compute: a fourth forward per DPO step);
    auto = only where the step would not fit without it, decided at the first trained forward from the bytes it
    saves and the device's free memory (mmalign.models.checkpointing); on under FSDP / DeepSpeed and, for
    denoisers, with model.compile. Where it stays on, a diffusion LoRA run's report names the model.storage_dtype
    that would free memory, and whether enough to turn it off"""

    def validate(self):
        super().validate()
        if self.reference == "peft" and self.lora is None:
            raise ConfigError("model.reference=peft needs model.lora")


@dataclass(kw_only=True)
class LMModelSection(PolicySource):
    """``name_or_path`` for AutoModelForCausalLM; ``tiny`` e.g. {arch: gpt2, n_layer: 2, n_embd: 64, n_head: 4}."""

    tokenizer: Optional[str] = None
    """defaults to name_or_path"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """the dtype the model's weights are loaded in"""
    dropout: Optional[float] = 0.0
    """override the model's dropout (DPO is usually trained with dropout off); null keeps the config's"""


@dataclass(kw_only=True)
class TextDataSection:
    train: Optional[str] = None
    """JSONL / JSON / parquet file or directory, a datasets.save_to_disk directory, or a hub dataset name"""
    eval: Optional[str] = None
    """held-out pairs in the same format: loss and implicit reward accuracy at every evaluation"""
    split: str = "train"
    """the split of a DatasetDict / hub dataset to train on"""
    eval_split: str = "test"
    """the split to evaluate on when data.eval names a DatasetDict / hub dataset"""
    columns: dict[str, str] = field(default_factory=dict)
    """rename source columns to ours, e.g. {question: prompt}"""
    max_length: int = 256
    """prompt + completion tokens (completions are truncated, prompts kept)"""
    max_prompt_length: int = 128
    """prompt tokens (prompts are truncated from the left)"""
    max_eval_examples: Optional[int] = None
    """use only the first N evaluation rows"""
    allow_outside_root: bool = False
    """image paths in the data may resolve outside the data file's folder (vision data; trusted data only)"""


@dataclass(kw_only=True)
class OnlineBase:
    """On-policy rounds inside one training run (``mmalign.train.online``), for every modality: each round
    samples ``samples`` outputs per prompt from the current policy, scores them, trains ``steps_per_round``
    optimiser steps on the rows they give; ``train.max_steps`` is ``rounds x steps_per_round``. The run
    evaluates after every round (and at step 0)."""

    rounds: int = 2
    """how many rounds of sample -> score -> train"""
    steps_per_round: int = 20
    """optimiser steps on each round's rows"""
    samples: int = 4
    """K, outputs sampled per prompt per round (at least 2: a preference needs two)"""
    prompts: Optional[str] = None
    """a .txt / .jsonl / .csv / parquet file of prompts, or a prompt set (shapes, partiprompts, ...)"""
    max_prompts: Optional[int] = None
    """use only the first N prompts"""

    def validate(self):
        for k in ("rounds", "steps_per_round"):
            if getattr(self, k) < 1:
                raise ConfigError(f"online.{k} must be >= 1, got {getattr(self, k)}")
        if self.samples < 2:
            raise ConfigError(f"online.samples must be >= 2 (a preference needs two outputs of a prompt), got "
                              f"{self.samples}")


def bind_rounds(train: "TrainSection", online: OnlineBase | None, max_steps_default: int = 100):
    """An online run trains ``rounds x steps_per_round`` steps: set (or check) ``train.max_steps`` to that."""
    if online is None:
        return
    total = online.rounds * online.steps_per_round
    if train.max_steps not in (max_steps_default, total):
        raise ConfigError(f"train.max_steps={train.max_steps}, but online rounds train online.rounds x "
                          f"online.steps_per_round = {total} steps: leave train.max_steps out")
    train.max_steps = total


@dataclass(kw_only=True)
class TextOnlineSection(OnlineBase):
    """On-policy rounds for text: K samples per prompt from the current policy, scored by ``reward``; pairwise
    losses train on best-vs-worst pairs (with the reward margin), group losses (DisCO, f-DPG) on whole groups.
    HyPO instead samples inside every step (no rounds needed). ``prompts``: default the prompts of data.train."""

    temperature: float = 1.0
    """sampling temperature of the completions"""
    max_new_tokens: int = 16
    """length limit of each sampled completion"""
    reward: str = ""
    """py:module:function, f(prompt, completion) -> float; several joined by "+" (optionally weighted, 0.5*py:...)
    are summed (each transformed first when ``reward_transform``: a logical AND of the rewards)"""
    reward_transform: bool = False
    """score with log sigmoid(r - r_ref(x)), r_ref = the ``reference_quantile`` of round 0's rewards for the
    prompt (Wang et al. 2024, arXiv 2402.00742)"""
    reference_quantile: float = 0.5
    """the quantile of round 0's rewards per prompt used as r_ref(x) by reward_transform"""
    eval_prompts: Optional[str] = None
    """held-out prompts: at each evaluation, the mean ``reward`` of ``eval_samples`` samples per prompt"""
    eval_samples: int = 4
    """completions sampled per held-out prompt at each evaluation"""

    def validate(self):
        super().validate()
        from mmalign.rewards.spec import parse_reward_spec  # rewards: loaded when a text config has online rounds

        if any(t.kind != "py" for t in parse_reward_spec(self.reward, "online.reward")):
            raise ConfigError(f"online.reward: text rewards are Python functions f(prompt, completion), named "
                              f"py:module:function; got {self.reward!r}")


@dataclass(kw_only=True)
class LMConfig:
    """Preference training of a causal LM (``recipe: lm``)."""

    recipe: Literal["lm"] = "lm"
    """which recipe the config is for (``mmalign train`` runs it)"""
    model: LMModelSection
    """the model trained: a hub id / local folder or a tiny config, LoRA or full fine-tuning, and its reference"""
    data: TextDataSection = field(default_factory=TextDataSection)
    """the training (and evaluation) data"""
    loss: LossSection = field(default_factory=LossSection)
    """the objective: a LOSSES name and its hyper-parameters"""
    train: TrainSection = field(default_factory=TrainSection)
    """the loop: steps, batch, optimiser, schedule, precision, logging, evaluation, checkpoints"""
    token_weights: Literal["mask", "sigmoid", "zn_rescale"] = "sigmoid"
    """sparse_po only: token weights from the reference's last hidden states (MaPO), or the plain mask"""
    token_kl: bool = True
    """sparse_po only: include the per-token KL term d"""
    online: Optional[TextOnlineSection] = None
    """on-policy rounds (online DPO, DisCO, f-DPG); HyPO also uses its samples / temperature settings"""

    runner = "mmalign.train.lm:run"

    def validate(self):
        kind = self.loss.fn.kind
        if kind not in ("pairwise", "token", "unpaired", "listwise", "negatives", "group"):
            raise ConfigError(f"recipe lm takes preference losses; {self.loss.name!r} is {kind}")
        if kind == "group" and self.online is None:
            raise ConfigError(f"loss {self.loss.name!r} learns from groups of on-policy samples: set online "
                              "(prompts, samples, reward)")
        if "online_samples" in self.loss.fn.uses and self.online is None:
            raise ConfigError(f"loss {self.loss.name!r} needs fresh policy samples each step: set online "
                              "(samples, temperature, max_new_tokens; its reward is not used)")
        if self.data.train is None and (self.online is None or "online_samples" in self.loss.fn.uses):
            raise ConfigError("lm: set data.train (offline data), or online for on-policy rounds")
        if self.online is not None and self.online.prompts is None and self.data.train is None:
            raise ConfigError("online.prompts: the rounds need prompts: set online.prompts or data.train")
        check_loss_and_batching(self.loss, self.train)
        if "online_samples" not in self.loss.fn.uses:
            bind_rounds(self.train, self.online)


RECIPES["lm"] = LMConfig


# ---------------------------------------------------------------------------------------- diffusion


@dataclass(kw_only=True)
class DiffusionModelSection(PolicySource):
    """``name_or_path``: a diffusers pipeline folder or hub id, e.g. stabilityai/stable-diffusion-xl-base-1.0;
    ``tiny``: random tiny components from configs (tests), e.g. {seed: 0, sample_size: 16}."""

    kind: Literal["sd", "sdxl", "sd3", "flux"] = "sd"
    """sd = SD 1.x / 2.x (one text encoder), sdxl = two text encoders + micro-conditioning,
    sd3 = SD3 / SD3.5 (flow matching, two CLIP + T5), flux = FLUX.1 (flow matching, CLIP + T5, packed latents)"""
    vae: Optional[str] = None
    """alternative VAE, e.g. madebyollin/sdxl-vae-fp16-fix"""
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = "auto"
    """UNets: epsilon or v_prediction; auto = the scheduler config's (SD 2.1 is v_prediction)"""
    reference_offload: bool = not_in("reference", default=False)
    """keep the frozen reference copy on CPU, moving layers to the accelerator as they run"""
    attention: Literal["sdpa", "xformers"] = "sdpa"
    """sdpa (PyTorch scaled-dot-product attention) or xformers (the [gpu] extra)"""
    channels_last: bool = False
    """UNet families: keep the UNet's convolution weights (and so its activations) in NHWC memory layout"""
    compile: bool = not_in("reference", default=False)
    """torch.compile the denoiser"""
    ema: bool = not_in("reference", default=False)
    """keep an EMA of the trained weights (diffusers EMAModel); the full export holds the EMA weights"""
    ema_decay: float = not_in("reference", default=0.9999)
    """the EMA's decay per step"""
    frozen_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of every frozen weight -- VAE, text encoders, the reference copy and, under LoRA, the base
    UNet/transformer (LoRA weights stay fp32, as in the diffusers scripts); auto = bf16 / fp16 with
    train.mixed_precision bf16 / fp16, else fp32"""
    storage_dtype: Optional[Literal["auto", "bfloat16", "float16", "float8_e4m3fn"]] = None
    """LoRA only: store the frozen Linear / Conv2d weights of the UNet/transformer in this dtype and upcast each
    layer to model.frozen_dtype just for its forward and backward (layer-wise casting that works with gradient
    checkpointing, mmalign.diffusion.storage); null = store them in model.frozen_dtype; auto (the shipped LoRA
    configs) = bfloat16 where model.frozen_dtype is float32 (train.mixed_precision no), else null -- the frozen
    base in 16 bits whatever the compute precision, as the diffusers scripts keep it under mixed precision"""
    reference_record: bool = not_in("reference", default=True)
    """with data.cache_dir: keep the reference scores the steps compute there, and read them where a later run
    draws the same noise (same data and train.seed: a sweep over beta, lr, loss or LoRA rank) or an eval repeats
    its draws -- the reference forward then leaves those steps (mmalign.diffusion.cache.ReferenceRecord)"""

    def validate(self):
        super().validate()
        if self.storage_dtype not in (None, "auto") and self.lora is None:
            raise ConfigError("model.storage_dtype needs model.lora (a full fine-tune has no frozen denoiser weights "
                              "to store low)")


@dataclass(kw_only=True)
class DiffusionDataSection(PairDrawOptions):
    """Image preference pairs: where they come from, how they are read and cached; what is drawn per pair comes
    from the diffusion wing's own ``PairDrawOptions`` (resolution, flip, caption dropout, noise draws, latents)."""

    train: Optional[str] = None
    """Pick-a-Pic-style parquet file/folder, save_to_disk folder, imagefolder with metadata.jsonl, or hub name
    (optional for online runs, whose pairs are sampled; their prompts default to its captions)"""
    split: str = "train"
    """the split of a DatasetDict / hub dataset to train on"""
    eval: Optional[str] = None
    """held-out pairs: implicit reward accuracy and loss are reported at every train.eval_every steps"""
    eval_split: str = "validation"
    """the split to evaluate on when data.eval names a DatasetDict / hub dataset"""
    max_eval_examples: Optional[int] = None
    """use only the first N evaluation pairs"""
    columns: dict[str, str] = field(default_factory=dict)
    """rename source columns to the Pick-a-Pic names, e.g. {prompt: caption}"""
    center_crop: bool = True
    """center crop (torchvision's geometry); false: a random crop drawn once per (seed, row)"""
    drop_ties: bool = True
    """drop pairs labelled 0.5 / 0.5 (counted); false makes a tie an error"""
    max_examples: Optional[int] = None
    """use only the first N (non-tie) pairs"""
    cache_dir: Optional[str] = None
    """cache VAE latents (+ flipped) and text embeddings here (safetensors shards, resumable)"""
    cache_build: Literal["auto", "before_training", "while_training"] = not_in("reference", default="auto")
    """before_training: encode every pair (both orientations) before the first step, so no step runs the VAE or
    the text encoders; while_training: each step encodes what it draws, as the diffusers script does, and keeps it
    (mmalign.diffusion.fill; complete, it becomes the shard cache). auto: while_training when the run reads each
    training pair at most once (max_steps x batch x grad_accum x processes <= pairs) and the reference is not
    precomputed, else before_training"""
    dual_captions: bool = False
    """DCPO: read caption_0 / caption_1 and condition each image on its own caption"""
    label_mode: Literal["winner_first", "soft"] = "winner_first"
    """soft: keep image 0 as 'chosen' and pass label_0 as a per-pair soft label (RPO's reference-vs-generated
    pairs with Bernoulli labels); winner_first: reorder so the preferred image comes first"""
    allow_outside_root: bool = False
    """an image-folder dataset may name files outside its folder (../x.png, absolute paths): trusted data only"""
    cache_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of cached latents / embeddings; auto = the training dtype (fp32 without mixed precision)"""



@dataclass(kw_only=True)
class InversionSection:
    """DDIM-InPO: x_t from DDIM inversion of x0 with the policy UNet, target re-derived (arXiv 2503.18454)."""

    steps: int = 10
    """inversion grid size: 10 gives {1, 101, ..., 901}"""
    eta: float = 0.1
    """DDIM eta of the inversion steps"""
    exact_t: bool = True
    """finish with a partial step to t itself (false: stop at the grid point below t, as the InPO code)"""


@dataclass(kw_only=True)
class PPDSection:
    """Personalised preference fine-tuning: per-user embeddings through decoupled cross-attention."""

    encoder: str = "toy_clip"
    """a CLIP-family REWARDS entry whose image encoder summarises each user's examples"""
    encoder_model: Optional[str] = None
    """weights of the encoder (default the REWARDS entry's own)"""
    encoder_tiny: bool = False
    """random tiny encoder weights (tests)"""
    examples_per_user: int = 4
    """how many of each user's first pairs embed the user"""
    n_tokens: int = 4
    """user tokens appended to the text in cross-attention"""
    scale: float = 1.0
    """scale of the user branch's attention output"""


@dataclass(kw_only=True)
class FlowSection:
    """Flow-matching families (sd3, flux): how sigma is drawn and what the transformer is told.
    Defaults: logit-normal(0, 1) (Esser et al. 2024, Sec. 3.1; the diffusers SD3 training default), Flux
    guidance 3.5 (the diffusers Flux training default)."""

    timestep_sampling: Literal["uniform", "logit_normal", "mode"] = "logit_normal"
    """how u in [0, 1) is drawn before indexing the scheduler's sigma table"""
    logit_mean: float = 0.0
    """logit_normal: mean of the normal before the sigmoid"""
    logit_std: float = 1.0
    """logit_normal: standard deviation of the normal before the sigmoid"""
    mode_scale: float = 1.29
    """mode: the SD3 paper's scale s (Sec. 3.1)"""
    guidance: float = 3.5
    """Flux guidance embedding (FLUX.1-dev is guidance-distilled); ignored by models without one"""
    max_sequence_length: int = 0
    """T5 tokens; 0 = the pipeline's default (256 SD3, 512 Flux) capped by the tokenizer's maximum"""


@dataclass(kw_only=True)
class ValidationSection(ValidationOptions):
    """Sample grids from fixed prompts and seeds at every ``train.eval_every`` steps (and step 0); the fields are
    the diffusion wing's ``ValidationOptions``."""


@dataclass(kw_only=True)
class DiffusionOnlineSection(OnlineBase):
    """Online alignment of a text-to-image model (``mmalign.diffusion.online``): each round samples ``samples``
    images per prompt from the current policy (classifier-free guidance, noise keyed by (seed, round, prompt,
    k)), keeps their final latents, scores the decoded images with ``reward`` and trains the recipe's pairwise
    loss on pairs from each prompt's group. After every round the trained reward and the held-out ``panel``
    (rewards not trained on, plus saturation, brightness, diversity and latent norm) are scored on
    ``eval_prompts`` x ``eval_seeds``; ``guard`` > 0 stops a run whose panel falls while the trained reward
    rises. ``prompts``: default the captions of data.train."""

    reward: str = "reward:pickscore"
    """the trained reward: reward:NAME, world:NAME or py:module:function (f(images, prompts) -> scores), several
    joined by + with optional weights (0.7*reward:pickscore + 0.3*reward:hpsv2)"""
    normalize: Literal["group", "none"] = "group"
    """group: each reward term is z-scored within a prompt's group before the weighted sum (rewards on
    different scales weigh as their weights say); none: the raw weighted sum"""
    reward_models: dict[str, str] = field(default_factory=dict)
    """weights per REWARDS name for reward and panel, e.g. {hpsv2: /models/HPS_v2.1_compressed.pt}"""
    tiny_rewards: bool = False
    """random tiny reward weights (tests and smoke runs)"""
    pairs: Literal["best_worst", "halves", "all"] = "best_worst"
    """best_worst: one pair per prompt, its best vs its worst image (flow_grpo's online DPO); halves: the i-th best
    vs the i-th worst image, K/2 pairs per prompt (the demo's labelling); all: every pair whose margin exceeds
    min_margin, up to K(K-1)/2 per prompt"""
    min_margin: float = 0.0
    """a pair needs reward(winner) - reward(loser) > min_margin (> 0 always: equal scores carry no preference)"""
    sample_steps: int = 20
    """sampler steps of each rollout image"""
    guidance: float = 5.0
    """classifier-free guidance scale of the rollouts and the evaluation samples"""
    resolution: Optional[int] = None
    """default data.resolution"""
    scheduler: Literal["ddim", "euler"] = "ddim"
    """UNet families: the rollout sampler (deterministic DDIM, or Euler discrete); flow models use their own
    flow-matching Euler sampler"""
    prompts_per_batch: int = 4
    """prompts per sampling call (x samples images, x2 with guidance); a round's calls are shared across processes"""
    prompts_per_round: Optional[int] = None
    """sample this many of the prompts each round, a different subset per round keyed by (seed, round) (flow_grpo
    draws m prompts per epoch); default all of them every round"""
    panel: str = ""
    """held-out rewards, not trained on, scored every round (same syntax as reward)"""
    eval_prompts: Optional[str] = None
    """the evaluation prompts (default: online.prompts); those not among the training prompts are reported as held
    out"""
    eval_seeds: int = 4
    """images per evaluation prompt (fixed seeds, the same every round)"""
    eval_steps: Optional[int] = None
    """sampler steps of the evaluation images (default sample_steps; flow_grpo and DiffusionNFT evaluate with 40)"""
    guard: int = 0
    """stop after this many rounds in a row in which the trained reward rose while a panel entry fell below the
    interval of its best round, and keep the best round's weights (0 = report only)"""
    # ---- group RL (loss grpo / nft / awm): mmalign.diffusion.rl
    global_std: bool = True
    """advantages (r - group mean) / (std + 1e-4) with the std of all the round's rewards (flow_grpo's SD3 configs,
    DiffusionNFT) or, false, of the prompt's group"""
    noise_level: float = 0.7
    """GRPO on flow models: a in the SDE step's sigma_t = a sqrt(sigma / (1 - sigma)) (Flow-GRPO: 0.7)"""
    eta: float = 1.0
    """GRPO on UNets: DDIM's eta on the stochastic steps (DDPO: 1.0)"""
    sde_window: int = 0
    """GRPO: 0 = every step but the last is stochastic and trained (Flow-GRPO); w > 0 = w consecutive steps per
    sampling call, started at a keyed draw within sde_range (Flow-GRPO-Fast: 2; the other steps are ODE steps)"""
    sde_range: Optional[list[int]] = None
    """GRPO with sde_window: [first, last) steps the window may cover (default: all but the last)"""
    old_decay_rate: float = 0.001
    """NFT's old policy / AWM's anchor: lam grows by this per step (see old_decay_max)"""
    old_decay_max: float = 0.5
    """NFT's old policy (its sampler and v_old) and AWM's anchor: after each round old <- lam old + (1 - lam) theta,
    lam = min(old_decay_rate x step, old_decay_max) (DiffusionNFT's defaults; AWM's anchor is capped at 0.3)"""
    awm_weighting: Literal["ghuber", "uniform"] = "ghuber"
    """AWM's log-likelihood: ghuber (the authors' configs) or the plain negative flow-matching loss"""
    ghuber_power: float = 0.25
    """p of AWM's ghuber weighting (the authors' 0.25)"""

    def validate(self):
        super().validate()
        from mmalign.rewards.spec import parse_reward_spec  # rewards: loaded when a config has online rounds

        trained = parse_reward_spec(self.reward, "online.reward")
        if self.panel:
            panel = parse_reward_spec(self.panel, "online.panel")
            both = sorted({t.label for t in trained} & {t.label for t in panel})
            if both:
                raise ConfigError(f"online.panel repeats the trained reward ({', '.join(both)}): the panel must be "
                                  "rewards the run is not trained on, or it cannot show hacking")
        for k in ("sample_steps", "prompts_per_batch", "eval_seeds") + (("prompts_per_round",)
                                                                         if self.prompts_per_round is not None else ()):
            if getattr(self, k) < 1:
                raise ConfigError(f"online.{k} must be >= 1, got {getattr(self, k)}")
        if self.min_margin < 0 or self.guard < 0:
            raise ConfigError("online.min_margin and online.guard must be >= 0")
        if self.noise_level <= 0 or self.eta <= 0 or self.sde_window < 0:
            raise ConfigError("online.noise_level and online.eta must be > 0, online.sde_window >= 0")


@dataclass(kw_only=True)
class DiffusionConfig:
    """Diffusion-DPO and relatives on SD 1.5 / 2.1 / SDXL and flow-matching SD3 / SD3.5 / FLUX.1
    (``recipe: diffusion``).

    ``loss.beta`` is Diffusion-DPO's beta in the Salesforce convention (SDXL 5000, SD1.5 2000-5000):
    scores are ``-mse`` and the loss core receives ``BETA_SCALE`` * beta = beta/2, i.e.
    loss = -log sigmoid(-0.5 beta ((mse_w - mse_l) - (ref_w - ref_l))) (``mmalign.diffusion.families``).
    """

    recipe: Literal["diffusion"] = "diffusion"
    """which recipe the config is for (``mmalign train`` runs it)"""
    model: DiffusionModelSection
    """the model trained: a hub id / local folder or a tiny config, LoRA or full fine-tuning, and its reference"""
    data: DiffusionDataSection
    """the training (and evaluation) data"""
    loss: LossSection = field(default_factory=lambda: LossSection(name="dpo", params={"beta": DEFAULT_BETA}))
    """the objective: a LOSSES name and its hyper-parameters"""
    train: TrainSection = field(default_factory=TrainSection)
    """the loop: steps, batch, optimiser, schedule, precision, logging, evaluation, checkpoints"""
    validation: ValidationSection = field(default_factory=ValidationSection)
    """sample grids (and a reward on them) on fixed prompts and seeds during training"""
    inversion: Optional[InversionSection] = None
    """set to use DDIM-InPO inputs (inverted latents, re-derived noise) with any pairwise loss"""
    ppd: Optional[PPDSection] = None
    """set for multi-user PPD training (data needs a user_id column)"""
    flow: FlowSection = field(default_factory=FlowSection)
    """flow-matching options (model.kind sd3 / flux)"""
    online: Optional[DiffusionOnlineSection] = None
    """online rounds: pairs sampled from the current policy and labelled by a reward (instead of data.train)"""

    runner = "mmalign.train.diffusion:run"

    def validate(self):
        kind = self.loss.fn.kind
        if kind in ("policy_ratio", "flow_ratio", "flow_mix"):
            if self.online is None:
                raise ConfigError(f"loss {self.loss.name!r} learns from groups of samples of the current model: set "
                                  "online (prompts, samples, reward)")
        elif kind != "pairwise":
            raise ConfigError(f"loss {self.loss.name!r} is {kind}; diffusion recipes take pairwise losses (offline or "
                              "online) or the group objectives grpo, nft, awm (online)")
        check_loss_and_batching(self.loss, self.train)
        if self.inversion is not None and self.model.reference == "precomputed":
            raise ConfigError("inversion (DDIM-InPO) inverts with the current policy, so its reference scores "
                              "cannot be precomputed: use model.reference=peft or copy")
        if self.inversion is not None and self.model.prediction_type == "v_prediction":
            raise ConfigError("inversion (DDIM-InPO) is defined for epsilon-prediction models")
        if self.model.kind in ("sd3", "flux"):
            if self.inversion is not None:
                raise ConfigError(f"inversion (DDIM-InPO) is defined for DDPM UNets (sd, sdxl); model.kind="
                                  f"{self.model.kind} is a flow-matching model, whose ODE inversion is not implemented")
            if self.ppd is not None:
                raise ConfigError("ppd's user branch is built into UNet cross-attention (sd, sdxl); "
                                  f"model.kind={self.model.kind} has joint attention")
            if self.model.prediction_type != "auto":
                raise ConfigError(f"model.prediction_type is for UNets; {self.model.kind} predicts the flow velocity")
        if self.model.kind == "flux" and self.data.resolution % 16:
            raise ConfigError(f"data.resolution must be a multiple of 16 for Flux (2x2 packed latents), got "
                              f"{self.data.resolution}")
        if self.model.reference == "precomputed" and self.data.noise_draws < 1:
            raise ConfigError("model.reference=precomputed needs data.noise_draws >= 1 (the fixed noise draws "
                              "whose reference scores are computed before training)")
        self._validate_online()

    def _validate_online(self):
        o = self.online
        if o is None:
            if self.data.train is None:
                raise ConfigError("data.train: required (or set online for pairs sampled during training)")
            return
        from mmalign.rewards.spec import needs_prompts, parse_reward_spec  # rewards: loaded for online configs

        if o.prompts is None and self.data.train is None:
            needy = [t.label for t in parse_reward_spec(o.reward, "online.reward") if needs_prompts(t)]
            raise ConfigError("online.prompts: the rounds need prompts to sample from" + (
                f" (and {', '.join(needy)} scores images against them)" if needy else "")
                + ": set online.prompts (a file or a prompt set) or data.train (its captions)")
        for what, bad in (("model.reference=precomputed", self.model.reference == "precomputed"),
                          ("inversion (DDIM-InPO)", self.inversion is not None), ("ppd", self.ppd is not None),
                          ("data.dual_captions", self.data.dual_captions), ("data.label_mode=soft",
                                                                            self.data.label_mode == "soft")):
            if bad:
                raise ConfigError(f"online rounds sample their own pairs; {what} is for offline data")
        if self.data.cache_dir:
            raise ConfigError("data.cache_dir: online pairs are sampled latents (nothing to cache); remove it")
        bind_rounds(self.train, o)


RECIPES["diffusion"] = DiffusionConfig


# ---------------------------------------------------------------------------------------- captioners


@dataclass(kw_only=True)
class CaptionerModelSection(ModelSource):
    """``name_or_path``: a ClipCap folder (captioner.json) or a BLIP hub id / folder; ``tiny``: a random tiny
    captioner {kind: clipcap | blip, clip: optional CLIP folder for clipcap}. No reference: the captioner
    recipe trains with a policy-gradient loss."""


@dataclass(kw_only=True)
class CaptionerDataSection:
    images: Optional[str] = None
    """a folder (or glob) of training images"""
    world: str = "shapes"
    """the plug-in world (``mmalign.worlds``) that renders world_images and measures content accuracy"""
    world_images: int = 0
    """render this many scenes of ``world`` instead of reading images (enables content-accuracy metrics)"""
    eval_images: Optional[str] = None
    """a folder (or glob) of evaluation images"""
    eval_world_images: int = 0
    """render this many held-out scenes of the world for evaluation"""
    seed: int = 0
    """seed of the world's renders"""

    def validate(self):
        if (self.images is None) == (self.world_images == 0):
            raise ConfigError("data: set exactly one of images or world_images")


@dataclass(kw_only=True)
class CaptionRewardSection:
    """R = clip_weight * CLIP-S + grammar_weight * P(grammatical) (Cho et al. 2022; the paper's form is
    1 / 2, the released code's 2 / 1), or the discriminative retrieval reward."""

    kind: Literal["clip_s", "retrieval"] = "clip_s"
    """clip_s (CLIP-S, optionally with the grammar head) or retrieval (discriminative finetuning)"""
    model: Optional[str] = None
    """CLIP backbone (hub id, folder, open_clip:NAME); a folder with grammar_head.safetensors enables grammar"""
    tiny: bool = False
    """random tiny reward weights (tests)"""
    prefix: str = "A photo depicts "
    """text prepended to each caption before the CLIP text encoder"""
    clip_weight: float = 1.0
    """weight of CLIP-S in the reward"""
    grammar_weight: float = 0.0
    """weight of P(grammatical) in the reward (needs a grammar head)"""


@dataclass(kw_only=True)
class RLSection:
    samples: int = 5
    """captions sampled per image per step"""
    baseline: Literal["greedy", "mean", "ema"] = "greedy"
    """greedy = SCST; mean = mean reward of the other samples; ema = running mean"""
    ema_momentum: float = 0.9
    """baseline ema: the running mean's momentum"""
    temperature: float = 1.0
    """sampling temperature of the captions"""


@dataclass(kw_only=True)
class CaptionerConfig:
    """Reward fine-tuning of an image captioner (``recipe: captioner``): SCST with a CLIP(+grammar)
    reward, or discriminative finetuning with a retrieval reward."""

    recipe: Literal["captioner"] = "captioner"
    """which recipe the config is for (``mmalign train`` runs it)"""
    model: CaptionerModelSection
    """the model trained: a hub id / local folder or a tiny config, LoRA or full fine-tuning, and its reference"""
    data: CaptionerDataSection
    """the training (and evaluation) data"""
    reward: CaptionRewardSection = field(default_factory=CaptionRewardSection)
    """the captioner's reward"""
    rl: RLSection = field(default_factory=RLSection)
    """the policy-gradient samples and baseline"""
    loss: LossSection = field(default_factory=lambda: LossSection(name="reinforce"))
    """the objective: a LOSSES name and its hyper-parameters"""
    train: TrainSection = field(default_factory=TrainSection)
    """the loop: steps, batch, optimiser, schedule, precision, logging, evaluation, checkpoints"""

    runner = "mmalign.train.captioner:run"

    def validate(self):
        if self.loss.fn.kind != "policy_gradient":
            raise ConfigError(f"recipe captioner trains with a policy-gradient loss (reinforce), not "
                              f"{self.loss.name!r}")


RECIPES["captioner"] = CaptionerConfig


# ---------------------------------------------------------------------------------------- VLMs


@dataclass(kw_only=True)
class VLMModelSection(PolicySource):
    """``name_or_path``: a LLaVA-style hub id / folder (AutoModelForImageTextToText + AutoProcessor);
    ``tiny``: a tiny VLM from configs {family: llava | paligemma, seed, hidden, layers, patch_size}."""

    freeze_vision: bool = True
    """keep the vision tower frozen (the projector and language model train)"""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """the dtype the model's weights are loaded in"""
    dropout: Optional[float] = 0.0
    """override the model's dropout (DPO is usually trained with dropout off); null keeps the config's"""


@dataclass(kw_only=True)
class VLMDataSection(TextDataSection):
    train: Optional[str] = None
    """the loop: steps, batch, optimiser, schedule, precision, logging, evaluation, checkpoints"""
    image_column: str = "image"
    """the column holding each row's image (bytes, an HF Image dict, a PIL image or a path)"""


@dataclass(kw_only=True)
class OnlineSection(OnlineBase):
    """On-policy rounds for a VLM: sample responses with the current policy, label them with a judge, train DPO.
    ``prompts``: a table with prompt + image columns; or use world_images."""

    steps_per_round: int = 50
    world_images: int = 0
    """N renders of the config's ``world`` x its QA questions"""
    temperature: float = 1.0
    """sampling temperature of the answers"""
    max_new_tokens: int = 24
    """length limit of each sampled answer"""
    judge: str = "world:shapes"
    """world:NAME (a world's QA judge on (image, question kind, response)) or reward:NAME (a REWARDS model
    scoring (image, response))"""

    def validate(self):
        super().validate()
        from mmalign.rewards.spec import parse_reward_spec  # rewards: loaded when a VLM config has online rounds

        terms = parse_reward_spec(self.judge, "online.judge")
        if len(terms) != 1 or terms[0].kind == "py" or terms[0].weight != 1.0:
            raise ConfigError(f"online.judge: one world:NAME or reward:NAME, got {self.judge!r}")
        if (self.prompts is None) == (self.world_images == 0):
            raise ConfigError("online: set exactly one of prompts (a table with prompt + image) or world_images")


@dataclass(kw_only=True)
class VLMConfig:
    """Preference training of a LLaVA-style VLM with any pairwise loss (``recipe: vlm``); offline pairs,
    or ``online`` rounds of on-policy pairs labelled by a judge (reward margin -> mm_dpo)."""

    recipe: Literal["vlm"] = "vlm"
    """which recipe the config is for (``mmalign train`` runs it)"""
    model: VLMModelSection
    """the model trained: a hub id / local folder or a tiny config, LoRA or full fine-tuning, and its reference"""
    data: VLMDataSection = field(default_factory=VLMDataSection)
    """the training (and evaluation) data"""
    loss: LossSection = field(default_factory=LossSection)
    """the objective: a LOSSES name and its hyper-parameters"""
    train: TrainSection = field(default_factory=TrainSection)
    """the loop: steps, batch, optimiser, schedule, precision, logging, evaluation, checkpoints"""
    online: Optional[OnlineSection] = None
    """on-policy rounds of answers labelled by a judge (instead of, or after, data.train)"""
    token_weights: Literal["mask", "sigmoid", "zn_rescale"] = "sigmoid"
    """sparse_po only: token weights from the reference's last hidden states (MaPO), or the plain mask"""
    token_kl: bool = True
    """sparse_po only: include the per-token KL term d"""
    world: str = "shapes"
    """the plug-in world (``mmalign.worlds``) for eval_qa, online world_images and the world judge"""
    eval_qa: int = 0
    """at each evaluation, answer the world's questions greedily on this many held-out renders and
    report qa_accuracy and hallucination_rate (the shapes-QA judge)"""

    runner = "mmalign.train.vlm:run"

    def validate(self):
        if self.loss.fn.kind != "pairwise":
            raise ConfigError(f"recipe vlm takes pairwise losses; {self.loss.name!r} is {self.loss.fn.kind}")
        if self.data.train is None and self.online is None:
            raise ConfigError("vlm: set data.train (offline pairs) or online (on-policy rounds)")
        check_loss_and_batching(self.loss, self.train)
        bind_rounds(self.train, self.online)


RECIPES["vlm"] = VLMConfig
