"""The one training loop every recipe uses (accelerate underneath: DDP / FSDP / DeepSpeed).

A recipe (the ``Recipe`` protocol of ``mmalign.train.recipe``) supplies the model, the data and
``compute(batch) -> StepOutput`` (per-example loss and metrics); this loop owns accumulation, the shared
reduction, mixed precision, gradient clipping, non-finite handling, logging, evaluation, checkpoints and
resume.

Determinism contract: the data order depends only on (seed, global batch), and recipes draw
per-example randomness from ``example_generator(seed, step, row)``, so an interrupted-and-resumed
run and a run on N processes see exactly the same examples and noise as one uninterrupted process.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from mmalign.config import ConfigError
from mmalign.data.records import DataError
from mmalign.losses import MetricSums, backward_loss
from mmalign.utils import (
    example_generator,  # noqa: F401  (re-exported: recipes key their draws by it)
    keep_cpu_heap,
    print_table,
)

from . import checkpoint as ckpt
from .sections import TrainSection

Tensor = torch.Tensor


class NonFiniteLossError(RuntimeError):
    """Raised under ``nan_policy: error``; a checkpoint of the last good state is written first."""


@dataclass
class StepOutput:
    loss: Tensor  # [B] per-example
    metrics: dict[str, Tensor] = field(default_factory=dict)  # each [B]


@dataclass
class TrainResult:
    step: int
    history: list[dict] = field(default_factory=list)
    eval_history: list[dict] = field(default_factory=list)
    skipped_steps: int = 0
    output_dir: str = ""
    last_checkpoint: str | None = None


class ResumableBatches(torch.utils.data.Sampler):
    """Infinite batch sampler: epoch e is ``randperm(n, seed + e)``, cut into global batches of
    ``batch_size * world`` rows (the tail that does not fill one is dropped); process ``rank`` takes
    its contiguous slice. ``start`` skips that many per-process batches without reading data."""

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, seed: int = 0, start: int = 0):
        if n < batch_size * world:
            raise ValueError(f"dataset has {n} rows, fewer than one global batch ({batch_size} x {world} processes)")
        self.n, self.b, self.world, self.rank, self.seed, self.start = n, batch_size, world, rank, seed, start
        self.per_epoch = n // (batch_size * world)

    def __iter__(self):
        i = self.start
        while True:
            epoch, k = divmod(i, self.per_epoch)
            g = torch.Generator().manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n, generator=g)
            gb = self.b * self.world
            while k < self.per_epoch:
                lo = k * gb + self.rank * self.b
                yield perm[lo: lo + self.b].tolist()
                k += 1
                i += 1

    def __len__(self):  # pragma: no cover - infinite; DataLoader only needs iteration
        return 2**62


def engine_label(acc) -> str:
    """' (FSDP)', ' (DEEPSPEED)', ' (MULTI_CPU)', ... for multi-process runs; '' for one process."""
    return "" if acc.num_processes == 1 else f" ({acc.distributed_type.name})"


def grads_finite(model) -> bool:
    """True when every gradient of ``model`` is finite (one fused reduction, no host sync per tensor)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, norm_type=2.0)))


def params_finite(model) -> bool:
    """True when every trainable parameter is finite (after an optimizer step: an infinite lr, an overflowing
    optimizer state). Checked per (device, dtype) group by the kernel ``GradScaler`` checks gradients with, at scale
    1 (which leaves every value as it is, to the bit: tests/test_loop.py): ~10 dispatched ops, where a total norm
    took ~5 per tensor (5,600 for an SDXL LoRA); the local tensors of shards under FSDP."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.requires_grad:
            p = p.to_local() if hasattr(p, "to_local") else p
            groups.setdefault((p.device, p.dtype), []).append(p)
    with torch.no_grad():
        for (dev, _), ps in groups.items():
            found = torch.zeros(1, device=dev)
            torch._amp_foreach_non_finite_check_and_unscale_(ps, found, torch.ones(1, device=dev))
            if found.item():
                return False
    return True


def _json_safe(v):
    """NaN / +-inf -> null: ``metrics.jsonl`` stays JSON (``json.dumps`` would write bare NaN / Infinity)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    return v


class MetricsLog:
    """``<output_dir>/metrics.jsonl`` on the main process: a fresh run starts it anew; a resumed run first drops
    the records written after the step it resumes from (they were lost with the interrupted run's state), so
    every step appears once."""

    def __init__(self, path: Path, resumed_step: int | None, main: bool):
        self.path, self.main = path, main
        if not main:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if resumed_step is None:
            path.unlink(missing_ok=True)
        elif path.exists():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resumed_step:
                        keep.append(line + "\n")
                except ValueError:
                    pass  # a line cut short by the kill that interrupted the run
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(keep))
            os.replace(tmp, path)

    def write(self, record: dict):
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(_json_safe(record)) + "\n")


def make_accelerator(cfg: TrainSection, **kw):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    log_with = []
    for t in cfg.report_to:
        if t == "tensorboard":
            try:
                import tensorboard  # noqa: F401
                log_with.append(t)
            except ImportError:
                pass
        elif t not in ("none", "jsonl"):
            log_with.append(t)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    # Without CUDA, run on CPU explicitly: then any launcher that sets WORLD_SIZE/LOCAL_RANK
    # (``accelerate launch --multi_gpu --num_processes 2``, ``torchrun``) gives gloo multi-CPU training.
    kw.setdefault("cpu", not torch.cuda.is_available())
    acc = Accelerator(mixed_precision=cfg.mixed_precision, log_with=log_with or None,
                      project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=cfg.output_dir),
                      **kw)
    _engine_as_launched(acc)
    return acc


def _engine_as_launched(acc) -> None:
    """Refuse to run plain data parallel when the launch asked for FSDP / DeepSpeed.

    accelerate builds FSDP and DeepSpeed states only for accelerator devices: on a machine without one,
    ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` starts gloo processes whose state is
    MULTI_CPU (``accelerate/state.py``: the FSDP branch is taken for MULTI_GPU/NPU/XPU/... only, DeepSpeed
    requires ``not cpu``), i.e. unsharded DDP -- silently. That is an error here, unless
    ``MMALIGN_FSDP_ON_CPU=1``: then the state is switched to accelerate's own FSDP path with the plugin the
    launch configured (FSDP2 runs on CPU with gloo), which is how the test-suite exercises sharded
    preparation, checkpointing and export without a GPU."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    wants_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if acc.distributed_type != DistributedType.MULTI_CPU or not (wants_fsdp or wants_ds):
        return
    if wants_fsdp and os.environ.get("MMALIGN_FSDP_ON_CPU") == "1":
        from accelerate.state import PartialState

        state = acc.state
        state.fsdp_plugin = getattr(state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()  # launch env
        # every AcceleratorState() re-reads PartialState's shared dict: switch both
        state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        return
    engine = "FSDP" if wants_fsdp else "DeepSpeed"
    raise ConfigError(
        f"the launch asked for {engine}, but accelerate runs {engine} on accelerator devices only: on this "
        "CPU-only machine it would fall back to unsharded data parallel without saying so. Use "
        "configs/accelerate/cpu_2proc.yaml (or `accelerate launch --multi_gpu --num_processes N`) on CPU"
        + ("; MMALIGN_FSDP_ON_CPU=1 runs accelerate's FSDP2 path on CPU (gloo) for testing" if wants_fsdp else ""))


def build_optimizer(params, cfg: TrainSection, lr: float, sharded: bool = False):
    """``sharded``: the parameters will be FSDP / DeepSpeed shards (torch picks the AdamW kernel, as before)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay,
                                 fused=None if sharded else _fused_adamw(params))
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("train.optimizer=adamw8bit needs bitsandbytes: pip install 'mmalign[gpu]'") from e
        return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def _fused_adamw(params) -> bool | None:
    """AdamW's fused kernel for plain CPU tensors (as ``transformers``' default ``adamw_torch_fused``): torch's own
    CPU default is a loop over the tensors (its foreach kernels fall back to the same loop there), ~31 dispatched
    ops per tensor -- 35k of an SDXL LoRA step's 180k, 24 ms; fused: 7.8k, 6 ms. The weights agree with the loop's
    to float32 rounding (the update's terms are summed in another order; tests/test_loop.py). Elsewhere (CUDA: its
    foreach kernels; DTensors; FSDP / DeepSpeed, whose shards replace the parameters after the optimizer is built:
    ``build_optimizer(sharded=True)``) torch's choice stays."""
    plain = all(type(p) is torch.nn.Parameter or type(p) is torch.Tensor for p in params)
    return True if plain and all(p.device.type == "cpu" and p.is_floating_point() for p in params) else None


def build_scheduler(optimizer, cfg: TrainSection):
    warm, total = cfg.warmup_steps, cfg.max_steps

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if cfg.scheduler == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def effective_lr(cfg: TrainSection, world: int) -> float:
    """``scale_lr``: lr * pairs per optimiser step (Diffusion-DPO: 1e-8 * 2048 = 2.048e-5)."""
    return cfg.lr * (cfg.batch_size * cfg.grad_accum * world if cfg.scale_lr else 1)


def _flat_scalars(d: dict, prefix="") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_scalars(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
    return out


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Cluster pre-emption (SIGTERM) is handled like Ctrl-C: checkpoint, then stop."""
    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        prev = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, prev)


def train(recipe, cfg: TrainSection, accelerator, config: dict | None = None,
          on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Run ``cfg.max_steps`` optimiser steps of ``recipe`` (see module docstring), holding the output_dir's lock."""
    if accelerator.device.type == "cpu":
        keep_cpu_heap()  # each CPU step re-allocates the same large buffers: reuse them (its docstring)
    with ckpt.output_lock(cfg.output_dir, accelerator.is_main_process):
        return _train(recipe, cfg, accelerator, config, on_step)


def _train(recipe, cfg: TrainSection, accelerator, config: dict | None = None,
           on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    run = _Run(recipe, cfg, accelerator, config, on_step)
    run.prepare()
    resumed = run.resume()
    run.open_logs(resumed)
    if (cfg.eval_every or run.online is not None) and run.step == 0:
        run.evaluate(0)
    if cfg.progress and accelerator.is_local_main_process:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=cfg.max_steps, initial=run.step, desc="train", dynamic_ncols=True)
    run.t0 = time.time()  # the first record's seconds per step count from here
    try:
        with _sigterm_as_interrupt():
            while run.step < cfg.max_steps and not run.one_step():
                pass
    except KeyboardInterrupt:
        if run.bar is not None:
            run.bar.close()
        path = run.save(run.step)
        accelerator.print(f"\ninterrupted: state of step {run.step} saved to {path}; continue with train.resume=latest")
        raise
    finally:
        if run.bar is not None:
            run.bar.close()
    if accelerator.log_with:
        accelerator.end_training()
    return run.result


class _Run:
    """The state of one ``train()`` call and its named steps: prepare (engine, optimizer, schedule), resume, the
    batches of the data or of the current online round, and per optimiser step: read the micro-batches,
    accumulate their gradients, apply the step or skip it (the NaN policy), then log / evaluate / save."""

    def __init__(self, recipe, cfg: TrainSection, acc, config: dict | None, on_step):
        self.recipe, self.cfg, self.acc, self.config, self.on_step = recipe, cfg, acc, config, on_step
        self.world, self.rank = acc.num_processes, acc.process_index
        self.out_dir = Path(cfg.output_dir)
        self.lr = effective_lr(cfg, self.world)
        self.online = getattr(recipe, "online", None)  # OnlineRounds: new data every steps_per_round steps
        self.step = self.skipped = self.skipped_rows = self.read_rows = 0
        self.batches, self.bar = None, None
        self.window, self.t0 = MetricSums(), 0.0

    def prepare(self):
        from accelerate.utils import DistributedType

        cfg, acc, recipe = self.cfg, self.acc, self.recipe
        if acc.distributed_type == DistributedType.DEEPSPEED and cfg.grad_accum > 1:
            raise ValueError("under DeepSpeed the engine steps inside backward(): use train.grad_accum=1 and set "
                             "gradient_accumulation_steps in the DeepSpeed config instead")
        loss_fn = recipe.loss_fn
        if loss_fn is not None and loss_fn.batch_dependent and self.world > 1:
            warnings.warn(f"loss {loss_fn.registry_name!r} is batch-dependent: each of the {self.world} processes "
                          "sorts its own shard, so the result differs from one process at the same global batch "
                          "(as in TRL)")
        optimizer = build_optimizer(recipe.trainable_parameters(), cfg, self.lr, sharded=ckpt.sharded_engine(acc))
        self.scheduler = build_scheduler(optimizer, cfg)
        self.model, self.optimizer = acc.prepare(recipe.trainable_module(), optimizer)
        recipe.bind(self.model)

    def resume(self) -> bool:
        """Load ``train.resume`` (``auto``: the latest checkpoint if any); a fresh run checks its folder."""
        cfg, acc, recipe = self.cfg, self.acc, self.recipe
        resume = cfg.resume
        if resume == "auto":
            resume = "latest" if (ckpt.checkpoint_dir(cfg.output_dir) / "latest").exists() else None
        if not resume:
            if acc.is_main_process:
                ckpt.check_fresh(cfg.output_dir)
            return False
        path = ckpt.resolve_checkpoint(cfg.output_dir, resume)
        loaded = ckpt.load_checkpoint(path, self.rank)
        if loaded.get("engine_dir"):
            acc.load_state(loaded["engine_dir"])
        else:
            recipe.load_trainable_state(loaded["model"])
            self.optimizer.load_state_dict(loaded["optimizer"])
        state = loaded["state"]
        self.scheduler.load_state_dict(state["scheduler"])
        recipe.load_extra_state(state.get("recipe", {}))
        ckpt.set_rng_state(loaded["rng"], state.get("rng"))
        self.step, self.skipped = state["step"], state.get("skipped_steps", 0)
        self.skipped_rows, self.read_rows = state.get("skipped_rows", 0), state.get("read_rows", 0)
        acc.print(f"resumed from {path} at step {self.step}")
        if self.online is not None:
            self.online.load_state_dict(state.get("online"))
        return True

    def open_logs(self, resumed: bool):
        cfg, acc, world = self.cfg, self.acc, self.world
        if self.online is None:
            self.batches = self.batches_from(self.step)  # online: the round is sampled after step 0's eval
        if acc.is_main_process:
            acc.print(f"training {self.recipe.describe()} | lr {self.lr:.3g}{' (scaled)' if cfg.scale_lr else ''} | "
                      f"global batch {cfg.batch_size * cfg.grad_accum * world} = {cfg.batch_size} x {cfg.grad_accum} "
                      f"accum x {world} proc{engine_label(acc)} | {cfg.max_steps} steps")
        if acc.log_with:
            acc.init_trackers("mmalign", config=_flat_scalars(self.config or {}))
        at = self.step if resumed else None
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", at, acc.is_main_process)
        if self.online is not None:
            self.online.log = MetricsLog(self.out_dir / "online.jsonl", at, acc.is_main_process)
        self.result = TrainResult(step=self.step, output_dir=str(self.out_dir), skipped_steps=self.skipped)

    def batches_from(self, at_step: int):
        """The batches from ``at_step`` on: the recipe's data (offline), or the data of the round ``at_step`` is
        in (online; round r's epochs are seeded seed + r, its first step is r x steps_per_round)."""
        cfg, online, recipe = self.cfg, self.online, self.recipe
        r, first = (0, 0) if online is None else (at_step // online.spr, at_step // online.spr * online.spr)
        data = recipe.train_data if online is None else online.data_for(r, at_step)
        if data is None:
            return None
        recipe.train_data = data
        if len(data) < cfg.batch_size * self.world:
            raise DataError(f"the training data has {len(data)} rows, fewer than one global batch (train.batch_size="
                            f"{cfg.batch_size} x {self.world} processes): lower train.batch_size or add data")
        sampler = ResumableBatches(len(data), cfg.batch_size, self.world, self.rank, cfg.seed + r,
                                   start=(at_step - first) * cfg.grad_accum)
        return iter(torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=data.collate,
                                                num_workers=cfg.num_workers))

    def reduce_sum(self, t: Tensor) -> Tensor:
        return self.acc.reduce(t.to(self.acc.device), reduction="sum").cpu() if self.world > 1 else t

    def log(self, record: dict):
        self.metrics.write(record)
        if self.acc.log_with:
            self.acc.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                         step=record["step"])

    def save(self, at_step: int) -> Path:
        cfg, online = self.cfg, self.online
        path = ckpt.save_checkpoint(
            cfg.output_dir, at_step, model_state=self.recipe.trainable_state(), optimizer=self.optimizer,
            scheduler=self.scheduler, accelerator=self.acc, keep=cfg.keep_checkpoints,
            state={"skipped_steps": self.skipped, "consumed_batches": at_step * cfg.grad_accum,
                   "skipped_rows": self.skipped_rows, "read_rows": self.read_rows,
                   "recipe": self.recipe.extra_state(), "config": self.config or {},
                   **({"online": online.state_dict()} if online is not None else {})})
        self.result.last_checkpoint = str(path)
        return path

    def evaluate(self, at_step: int):
        m = self.recipe.evaluate(at_step)
        if self.online is not None and at_step % self.online.spr == 0:  # the trained reward and the panel
            m = {**m, **self.online.evaluate(at_step)}
        if m:
            rec = {"step": at_step, **{f"eval/{k}": v for k, v in m.items()}}
            self.result.eval_history.append(rec)
            self.log(rec)

    def one_step(self) -> bool:
        """One optimiser step; True when the run stops early (an empty round, the recipe, the guard)."""
        online = self.online
        if online is not None and (self.batches is None or self.step % online.spr == 0):
            self.batches = self.batches_from(self.step)  # a new round: sampled now with the current weights
            if self.batches is None:
                return True  # the round gave too few informative rows (the source said so)
        micro, n_global, empty_step = self.read_micro_batches()
        bad_local, step_sums = self.accumulate(micro, n_global)
        bad, grad_norm = self.apply_or_skip(bad_local, empty_step)
        return self.after_step(step_sums, grad_norm, bad)

    def read_micro_batches(self):
        """The step's micro-batches, and the global count of readable rows; unreadable rows are counted and a
        run on mostly unreadable data stops (``_check_unreadable``)."""
        cfg = self.cfg
        micro = [next(self.batches) for _ in range(cfg.grad_accum)]
        counts = self.reduce_sum(torch.tensor([float(sum(len(b) for b in micro)),
                                               float(sum(getattr(b, "skipped", 0) for b in micro))]))
        n_global, n_unreadable = float(counts[0]), int(counts[1])
        self.skipped_rows += n_unreadable
        self.read_rows += int(n_global) + n_unreadable
        _check_unreadable(self.skipped_rows, self.read_rows, len(self.recipe.train_data), cfg.max_unreadable_fraction)
        empty_step = n_global == 0  # every row unreadable: the step is skipped (and counted as such)
        return micro, max(n_global, 1.0), empty_step

    def accumulate(self, micro, n_global: float):
        """Forward + backward of every micro-batch (gradients synchronised on the last); a non-finite loss
        stops the run under ``nan_policy: error`` (saving the last good state first), else marks the step bad."""
        cfg, acc, model, step = self.cfg, self.acc, self.model, self.step
        model.train()
        self.recipe.begin_step([b.to(acc.device) for b in micro if len(b)])  # step-level state, e.g. KTO's z0
        bad_local, step_sums = False, MetricSums()
        for i, batch in enumerate(micro):
            batch.to(acc.device)
            if len(batch) == 0:  # every row unreadable (reported by the dataset): contributes nothing
                continue
            with (contextlib.nullcontext() if i == len(micro) - 1 else acc.no_sync(model)):
                with acc.autocast():
                    out = self.recipe.compute(batch, step)
                finite = torch.isfinite(out.loss.detach())
                if not bool(finite.all()):
                    rows = batch.index[~finite.to(batch.index.device)].tolist()
                    if cfg.nan_policy == "error":
                        self.save(step)  # weights are still those of the last good step
                        raise NonFiniteLossError(
                            f"non-finite loss at step {step + 1}, dataset rows {rows} (process {self.rank}); state "
                            f"of step {step} saved to {self.result.last_checkpoint}. Set train.nan_policy=skip to "
                            "drop such steps.")
                    bad_local = True
                acc.backward(backward_loss(out.loss, n_global, self.world))
            step_sums.add(out.metrics, out.loss)
        return bad_local, step_sums

    def apply_or_skip(self, bad_local: bool, empty_step: bool):
        """Clip, then apply the optimiser step -- or skip it when any process saw a non-finite loss or
        gradient, or no readable rows; weights that come out non-finite stop the run, unsaved."""
        cfg, model, step = self.cfg, self.model, self.step
        grad_norm = None
        if cfg.max_grad_norm is not None:
            grad_norm = self.acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        # one reduction for both flags: a rank's non-finite loss, and (no clipping still means no silent
        # inf/NaN weights) a rank's non-finite gradient; with clipping the global norm already says it
        grads_local = cfg.max_grad_norm is None and not grads_finite(model)
        flags = self.reduce_sum(torch.tensor([float(bad_local), float(grads_local)]))
        bad = bool(flags[0] > 0) or empty_step
        grads_bad = not math.isfinite(float(grad_norm)) if grad_norm is not None else bool(flags[1] > 0)
        if grads_bad:
            if cfg.nan_policy == "error":
                self.save(step)
                raise NonFiniteLossError(f"non-finite gradient at step {step + 1}; state of step "
                                         f"{step} saved to {self.result.last_checkpoint}")
            bad = True
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            self.result.skipped_steps = self.skipped
            self.acc.print(f"step {step + 1}: {'no readable rows' if empty_step else 'non-finite loss/gradient'}, "
                           f"step skipped ({self.skipped} so far)")
            if self.skipped > cfg.max_skipped_steps:
                raise NonFiniteLossError(f"{self.skipped} steps skipped (no readable rows, or a non-finite loss or "
                                         f"gradient; train.max_skipped_steps={cfg.max_skipped_steps})")
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            ok = torch.tensor([float(params_finite(model))])
            if float(self.reduce_sum(ok)[0]) < self.world:  # never go on (or save, or export) with such weights
                raise NonFiniteLossError(
                    f"step {step + 1}: the optimizer step made the weights non-finite (lr "
                    f"{self.scheduler.get_last_lr()[0]:.3g}; the loss and gradients were finite); nothing of this "
                    f"state is saved. Last checkpoint: {self.result.last_checkpoint or 'none'}")
        with warnings.catch_warnings():  # a skipped step still advances the schedule
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        return bad, grad_norm

    def after_step(self, step_sums: MetricSums, grad_norm, bad: bool) -> bool:
        """Count the step, log (every log_every), tell the recipe, evaluate at eval_every and round ends (the
        recipe or the guard may stop the run: True), save at save_every."""
        cfg = self.cfg
        self.step += 1
        step = self.result.step = self.step
        for k in step_sums.sums:
            self.window.sums[k] += step_sums.sums[k]
            self.window.counts[k] += step_sums.counts[k]
        if self.bar is not None:
            self.bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            self.log_window(grad_norm)
        self.recipe.on_step_end(step, applied=not bad)  # after the step's record is written: none is ever lost
        round_end = self.online is not None and step % self.online.spr == 0
        if round_end or (cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps)):
            self.evaluate(step)
            halt = self.recipe.stop or (self.online is not None and self.online.stop)
            if float(self.reduce_sum(torch.tensor([float(halt)]))[0]) > 0:  # early stop by the recipe or the guard
                if cfg.save_every:
                    self.save(step)
                return True
        if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.max_steps):
            self.save(step)
        return False

    def log_window(self, grad_norm):
        """The training record of the steps since the last one: metric means over every process's rows."""
        cfg, step = self.cfg, self.step
        m = self.window.means(self.reduce_sum)
        rec = {"step": step, **{f"train/{k}": v for k, v in m.items()},
               "train/lr": self.scheduler.get_last_lr()[0], "train/skipped_steps": self.skipped,
               "train/skipped_rows": self.skipped_rows, "train/sec_per_step": (time.time() - self.t0) / cfg.log_every}
        if grad_norm is not None:
            rec["train/grad_norm"] = float(grad_norm)
        self.result.history.append(rec)
        self.log(rec)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{m.get('loss', float('nan')):.4f}",
                                 acc=f"{m.get('reward_accuracy', float('nan')):.3f}")
        if self.on_step is not None:
            self.on_step(step, rec)
        self.window, self.t0 = MetricSums(), time.time()


def _check_unreadable(unreadable: int, read: int, n_data: int, limit: float):
    """Stop when more than ``limit`` of the rows read so far could not be read (once a sample of
    min(dataset, 64) rows has been read): a dataset without readable images must not train "successfully"."""
    if unreadable and read >= min(n_data, 64) and unreadable > limit * read:
        raise DataError(f"{unreadable} of the {read} rows read so far were unreadable (more than "
                        f"train.max_unreadable_fraction={limit}): check the data (the warnings above name the rows)")


def eval_summary(result: TrainResult, accelerator=None) -> dict[str, float]:
    """Print the first-vs-last evaluation table (main process) and return the last values."""
    if not result.eval_history:
        return {}
    first, last = result.eval_history[0], result.eval_history[-1]
    keys = [k for k in sorted(first) if k != "step" and isinstance(first[k], float) and not math.isnan(first[k])
            and k in last]
    if accelerator is None or accelerator.is_main_process:
        print_table(["metric", f"step {first['step']}", f"step {last['step']}"],
                    [[k.removeprefix("eval/"), f"{first[k]:.4f}", f"{last[k]:.4f}"] for k in keys])
    return {k.removeprefix("eval/"): round(last[k], 4) for k in keys}
