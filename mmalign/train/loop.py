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
    optimizer state); one fused reduction over the local tensors (shards under FSDP)."""
    ps = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters() if p.requires_grad]
    return not ps or bool(torch.isfinite(torch.nn.utils.get_total_norm([p.detach() for p in ps], norm_type=2.0)))


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


def build_optimizer(params, cfg: TrainSection, lr: float):
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
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
    with ckpt.output_lock(cfg.output_dir, accelerator.is_main_process):
        return _train(recipe, cfg, accelerator, config, on_step)


def _train(recipe, cfg: TrainSection, accelerator, config: dict | None = None,
           on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    acc = accelerator
    world, rank = acc.num_processes, acc.process_index
    out_dir = Path(cfg.output_dir)
    lr = effective_lr(cfg, world)
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED and cfg.grad_accum > 1:
        raise ValueError("under DeepSpeed the engine steps inside backward(): use train.grad_accum=1 and set "
                         "gradient_accumulation_steps in the DeepSpeed config instead")
    loss_fn = recipe.loss_fn
    if loss_fn is not None and loss_fn.batch_dependent and world > 1:
        warnings.warn(f"loss {loss_fn.registry_name!r} is batch-dependent: each of the {world} processes sorts its "
                      "own shard, so the result differs from one process at the same global batch (as in TRL)")
    optimizer = build_optimizer(recipe.trainable_parameters(), cfg, lr)
    scheduler = build_scheduler(optimizer, cfg)
    model, optimizer = acc.prepare(recipe.trainable_module(), optimizer)
    recipe.bind(model)

    step, skipped, skipped_rows, read_rows = 0, 0, 0, 0
    resume = cfg.resume
    if resume == "auto":
        resume = "latest" if (ckpt.checkpoint_dir(cfg.output_dir) / "latest").exists() else None
    if not resume and acc.is_main_process:
        ckpt.check_fresh(cfg.output_dir)
    if resume:
        path = ckpt.resolve_checkpoint(cfg.output_dir, resume)
        loaded = ckpt.load_checkpoint(path, rank)
        if loaded.get("engine_dir"):
            acc.load_state(loaded["engine_dir"])
        else:
            recipe.load_trainable_state(loaded["model"])
            optimizer.load_state_dict(loaded["optimizer"])
        scheduler.load_state_dict(loaded["state"]["scheduler"])
        recipe.load_extra_state(loaded["state"].get("recipe", {}))
        ckpt.set_rng_state(loaded["rng"], loaded["state"].get("rng"))
        step, skipped = loaded["state"]["step"], loaded["state"].get("skipped_steps", 0)
        skipped_rows, read_rows = loaded["state"].get("skipped_rows", 0), loaded["state"].get("read_rows", 0)
        acc.print(f"resumed from {path} at step {step}")

    online = getattr(recipe, "online", None)  # OnlineRounds: the data changes every steps_per_round steps (mmalign.train.online)
    if online is not None and resume:
        online.load_state_dict(loaded["state"].get("online"))

    def batches_from(at_step: int):
        """The batches from ``at_step`` on: the recipe's data (offline), or the data of the round ``at_step`` is
        in (online; round r's epochs are seeded seed + r, its first step is r x steps_per_round)."""
        r, first = (0, 0) if online is None else (at_step // online.spr, at_step // online.spr * online.spr)
        data = recipe.train_data if online is None else online.data_for(r, at_step)
        if data is None:
            return None
        recipe.train_data = data
        if len(data) < cfg.batch_size * world:
            raise DataError(f"the training data has {len(data)} rows, fewer than one global batch (train.batch_size="
                            f"{cfg.batch_size} x {world} processes): lower train.batch_size or add data")
        sampler = ResumableBatches(len(data), cfg.batch_size, world, rank, cfg.seed + r,
                                   start=(at_step - first) * cfg.grad_accum)
        return iter(torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=data.collate,
                                                num_workers=cfg.num_workers))

    batches = batches_from(step) if online is None else None  # online: the round is sampled after step 0's eval

    if acc.is_main_process:
        acc.print(f"training {recipe.describe()} | lr {lr:.3g}{' (scaled)' if cfg.scale_lr else ''} | "
                  f"global batch {cfg.batch_size * cfg.grad_accum * world} = {cfg.batch_size} x {cfg.grad_accum} "
                  f"accum x {world} proc{engine_label(acc)} | {cfg.max_steps} steps")
    if acc.log_with:
        acc.init_trackers("mmalign", config=_flat_scalars(config or {}))
    metrics = MetricsLog(out_dir / "metrics.jsonl", step if resume else None, acc.is_main_process)
    if online is not None:
        online.log = MetricsLog(out_dir / "online.jsonl", step if resume else None, acc.is_main_process)
    result = TrainResult(step=step, output_dir=str(out_dir), skipped_steps=skipped)

    def reduce_sum(t: Tensor) -> Tensor:
        return acc.reduce(t.to(acc.device), reduction="sum").cpu() if world > 1 else t

    def log(record: dict):
        metrics.write(record)
        if acc.log_with:
            acc.log({k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))},
                    step=record["step"])

    def save(at_step: int) -> Path:
        path = ckpt.save_checkpoint(
            cfg.output_dir, at_step, model_state=recipe.trainable_state(), optimizer=optimizer,
            scheduler=scheduler, accelerator=acc, keep=cfg.keep_checkpoints,
            state={"skipped_steps": skipped, "consumed_batches": at_step * cfg.grad_accum,
                   "skipped_rows": skipped_rows, "read_rows": read_rows,
                   "recipe": recipe.extra_state(), "config": config or {},
                   **({"online": online.state_dict()} if online is not None else {})})
        result.last_checkpoint = str(path)
        return path

    def evaluate(at_step: int):
        m = recipe.evaluate(at_step)
        if online is not None and at_step % online.spr == 0:  # the trained reward and the panel after a round
            m = {**m, **online.evaluate(at_step)}
        if m:
            rec = {"step": at_step, **{f"eval/{k}": v for k, v in m.items()}}
            result.eval_history.append(rec)
            log(rec)

    if (cfg.eval_every or online is not None) and step == 0:
        evaluate(0)

    bar = None
    if cfg.progress and acc.is_local_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="train", dynamic_ncols=True)
    window = MetricSums()
    t0 = time.time()
    try:
        with _sigterm_as_interrupt():
            while step < cfg.max_steps:
                if online is not None and (batches is None or step % online.spr == 0):
                    batches = batches_from(step)  # a new round: sampled now with the current weights (or read back)
                    if batches is None:
                        break  # the round gave too few informative rows (the source said so)
                micro = [next(batches) for _ in range(cfg.grad_accum)]
                counts = reduce_sum(torch.tensor([float(sum(len(b) for b in micro)),
                                                  float(sum(getattr(b, "skipped", 0) for b in micro))]))
                n_global, n_unreadable = float(counts[0]), int(counts[1])
                skipped_rows, read_rows = skipped_rows + n_unreadable, read_rows + int(n_global) + n_unreadable
                _check_unreadable(skipped_rows, read_rows, len(recipe.train_data), cfg.max_unreadable_fraction)
                empty_step = n_global == 0  # every row unreadable: the step is skipped (and counted as such)
                n_global = max(n_global, 1.0)
                model.train()
                recipe.begin_step([b.to(acc.device) for b in micro if len(b)])  # step-level state, e.g. KTO's z0
                bad_local = False
                step_sums = MetricSums()
                for i, batch in enumerate(micro):
                    batch.to(acc.device)
                    sync = i == len(micro) - 1
                    if len(batch) == 0:  # every row unreadable (reported by the dataset): contributes nothing
                        continue
                    with (contextlib.nullcontext() if sync else acc.no_sync(model)):
                        with acc.autocast():
                            out = recipe.compute(batch, step)
                        finite = torch.isfinite(out.loss.detach())
                        if not bool(finite.all()):
                            rows = batch.index[~finite.to(batch.index.device)].tolist()
                            if cfg.nan_policy == "error":
                                save(step)  # weights are still those of the last good step
                                raise NonFiniteLossError(
                                    f"non-finite loss at step {step + 1}, dataset rows {rows} "
                                    f"(process {rank}); state of step {step} saved to {result.last_checkpoint}. "
                                    "Set train.nan_policy=skip to drop such steps.")
                            bad_local = True
                        acc.backward(backward_loss(out.loss, n_global, world))
                    step_sums.add(out.metrics, out.loss)
                grad_norm = None
                if cfg.max_grad_norm is not None:
                    grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                # one reduction for both flags: a rank's non-finite loss, and (no clipping still means no silent
                # inf/NaN weights) a rank's non-finite gradient; with clipping the global norm already says it
                grads_local = cfg.max_grad_norm is None and not grads_finite(model)
                flags = reduce_sum(torch.tensor([float(bad_local), float(grads_local)]))
                bad = bool(flags[0] > 0) or empty_step
                grads_bad = not math.isfinite(float(grad_norm)) if grad_norm is not None else bool(flags[1] > 0)
                if grads_bad:
                    if cfg.nan_policy == "error":
                        save(step)
                        raise NonFiniteLossError(f"non-finite gradient at step {step + 1}; state of step "
                                                 f"{step} saved to {result.last_checkpoint}")
                    bad = True
                if bad:
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    result.skipped_steps = skipped
                    acc.print(f"step {step + 1}: {'no readable rows' if empty_step else 'non-finite loss/gradient'}, "
                              f"step skipped ({skipped} so far)")
                    if skipped > cfg.max_skipped_steps:
                        raise NonFiniteLossError(f"{skipped} steps skipped (no readable rows, or a non-finite loss or "
                                                 f"gradient; train.max_skipped_steps={cfg.max_skipped_steps})")
                else:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    ok = torch.tensor([float(params_finite(model))])
                    if float(reduce_sum(ok)[0]) < world:  # never go on (or save, or export) with such weights
                        raise NonFiniteLossError(
                            f"step {step + 1}: the optimizer step made the weights non-finite (lr "
                            f"{scheduler.get_last_lr()[0]:.3g}; the loss and gradients were finite); nothing of this "
                            f"state is saved. Last checkpoint: {result.last_checkpoint or 'none'}")
                with warnings.catch_warnings():  # a skipped step still advances the schedule
                    warnings.simplefilter("ignore", UserWarning)
                    scheduler.step()
                step += 1
                result.step = step
                for k in step_sums.sums:
                    window.sums[k] += step_sums.sums[k]
                    window.counts[k] += step_sums.counts[k]
                if bar is not None:
                    bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    m = window.means(reduce_sum)
                    rec = {"step": step, **{f"train/{k}": v for k, v in m.items()},
                           "train/lr": scheduler.get_last_lr()[0], "train/skipped_steps": skipped,
                           "train/skipped_rows": skipped_rows,
                           "train/sec_per_step": (time.time() - t0) / cfg.log_every}
                    if grad_norm is not None:
                        rec["train/grad_norm"] = float(grad_norm)
                    result.history.append(rec)
                    log(rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{m.get('loss', float('nan')):.4f}",
                                        acc=f"{m.get('reward_accuracy', float('nan')):.3f}")
                    if on_step is not None:
                        on_step(step, rec)
                    window = MetricSums()
                    t0 = time.time()
                recipe.on_step_end(step, applied=not bad)  # after the step's record is written: none is ever lost
                round_end = online is not None and step % online.spr == 0
                if round_end or (cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps)):
                    evaluate(step)
                    halt = recipe.stop or (online is not None and online.stop)
                    if float(reduce_sum(torch.tensor([float(halt)]))[0]) > 0:  # early stop by the recipe or the guard
                        if cfg.save_every:
                            save(step)
                        break
                if cfg.save_every and (step % cfg.save_every == 0 or step == cfg.max_steps):
                    save(step)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        path = save(step)
        acc.print(f"\ninterrupted: state of step {step} saved to {path}; continue with train.resume=latest")
        raise
    finally:
        if bar is not None:
            bar.close()
    if acc.log_with:
        acc.end_training()
    return result


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
