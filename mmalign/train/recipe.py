"""The recipe contract, written down: what the training loop (``mmalign.train.loop.train``) calls, and a
base class holding the state every recipe shares.

A recipe owns a model, its data and ``compute(batch) -> StepOutput`` (per-example loss and metrics).
The loop owns accumulation, reduction, mixed precision, clipping, non-finite handling, logging,
evaluation scheduling, checkpoints and resume. Hand-off of the model: the loop prepares
``trainable_module()`` with accelerate (DDP / FSDP / DeepSpeed) and hands the wrapped module back through
``bind``; ``compute`` runs ``self.model``, so gradients are synchronised by the engine.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from accelerate.utils import set_seed

from mmalign.config import ConfigError, to_dict
from mmalign.losses import MetricSums
from mmalign.utils import replace_dir

from .loop import StepOutput, TrainResult, eval_summary, make_accelerator, train

Tensor = torch.Tensor


@runtime_checkable
class Recipe(Protocol):
    loss_fn: Any
    """the ``LOSSES`` entry (or None): the loop reads its capability flags (``batch_dependent``)"""
    train_data: Any
    """a Dataset whose ``collate(items)`` returns a batch with ``to(device)``, ``len`` and ``index`` (rows)"""

    def describe(self) -> str: ...
    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...
    def trainable_module(self) -> torch.nn.Module:
        """The module the engine wraps (not yet wrapped; called again for every ``train`` call)."""
    def bind(self, prepared: torch.nn.Module) -> None:
        """Receive the engine-wrapped module; ``compute`` runs it from now on."""
    def begin_step(self, micro_batches: list) -> None:
        """Before the micro-batches of an optimiser step: step-level state from all of them (KTO's z0)."""
    def compute(self, batch, step: int = 0, split: str = "train") -> StepOutput: ...
    def on_step_end(self, step: int, applied: bool = True) -> None:
        """After the optimiser step (``applied`` False when it was skipped): EMA, running statistics."""
    def evaluate(self, step: int) -> dict: ...
    def trainable_state(self) -> dict[str, Tensor]: ...
    def load_trainable_state(self, state: dict[str, Tensor]) -> None: ...
    def extra_state(self) -> dict: ...
    def load_extra_state(self, state: dict) -> None: ...
    def export(self, out_dir, card: dict | None = None) -> None: ...
    @property
    def stop(self) -> bool:
        """Early stopping requested by the recipe (checked after each evaluation, on any rank)."""


class RecipeBase:
    """Shared state and defaults: ``policy`` (the unwrapped trainable module), ``model`` (what ``compute``
    runs: the policy, compiled or engine-wrapped), ``eval_data``, optional ``ema`` (diffusers EMAModel) and
    ``running`` (a ``RunningMoments``, BCO's shift), one evaluation loop over ``eval_data``."""

    policy: torch.nn.Module
    model: torch.nn.Module
    loss_fn = None
    eval_data = None
    eval_mode = True
    """evaluate in eval() mode (text); diffusion keeps train mode (its UNet has no dropout, and diffusers'
    ResnetBlock2D computes bit-differently in eval mode, which would move the eval loss off ln 2)"""
    ema = None
    running = None
    compiled = None
    online = None
    """``OnlineRounds`` when the run samples its own data in rounds (``mmalign.train.online``)"""

    # ---------------------------------------------------------------- the model hand-off
    def trainable_module(self) -> torch.nn.Module:
        return self.compiled if self.compiled is not None else self.policy

    def bind(self, prepared: torch.nn.Module) -> None:
        self.model = prepared

    def trainable_parameters(self):
        return [p for p in self.policy.parameters() if p.requires_grad]

    # ---------------------------------------------------------------- step hooks
    def begin_step(self, micro_batches: list) -> None:
        pass

    def on_step_end(self, step: int, applied: bool = True) -> None:
        if self.ema is not None and applied:
            self.ema.step(self.trainable_parameters())
        if self.running is not None:  # BCO: this step's rewards, all micro-batches and processes, at once
            self.running.commit(self.reduce_sum) if applied else self.running.discard()

    @property
    def stop(self) -> bool:
        return False

    # ---------------------------------------------------------------- state
    def _named_trainable(self):
        return [(k, p) for k, p in self.policy.named_parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, Tensor]:
        named = self._named_trainable()
        state = {k: p.detach() for k, p in named}
        if self.ema is not None:
            state.update({f"ema/{k}": s for (k, _), s in zip(named, self.ema.shadow_params)})
        return state

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        """Exactly the trainable weights this run has, with their shapes (``copy_`` would broadcast a [1, d]
        tensor into every row of [n, d] without a word): any missing, unexpected or reshaped key is an error."""
        named = self._named_trainable()
        want = {k: tuple(p.shape) for k, p in named}
        if self.ema is not None:
            want.update({f"ema/{k}": tuple(s.shape) for (k, _), s in zip(named, self.ema.shadow_params)})
        missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
        shapes = [f"{k}: checkpoint {tuple(state[k].shape)}, model {want[k]}" for k in sorted(set(want) & set(state))
                  if tuple(state[k].shape) != want[k]]
        if missing or unexpected or shapes:
            what = [f"missing {missing[:3]}"] * bool(missing) + [f"unexpected {unexpected[:3]}"] * bool(unexpected) \
                + [f"shapes differ: {shapes[:3]}"] * bool(shapes)
            raise ConfigError(f"train.resume: the checkpoint does not fit this model ({'; '.join(what)}); resume with "
                              "the config it was trained with (model, LoRA rank, EMA)")
        with torch.no_grad():
            for k, p in named:
                p.copy_(state[k])
            if self.ema is not None:
                for (k, _), s in zip(named, self.ema.shadow_params):
                    s.copy_(state[f"ema/{k}"])

    def extra_state(self) -> dict:
        out = {}
        if self.running is not None:
            out["running"] = self.running.state_dict()
        if self.ema is not None:
            out["ema_step"] = self.ema.optimization_step
        return out

    def load_extra_state(self, state: dict) -> None:
        if self.running is not None and "running" in state:
            self.running.load_state_dict(state["running"])
        if self.ema is not None and "ema_step" in state:
            self.ema.optimization_step = state["ema_step"]

    # ---------------------------------------------------------------- evaluation
    @property
    def reduce_sum(self):
        """Sum a 1-D tensor over processes (``None`` on one process)."""
        acc = self.acc
        return (lambda t: acc.reduce(t.to(acc.device), reduction="sum").cpu()) if acc.num_processes > 1 else None

    @torch.no_grad()
    def evaluate_pairs(self, data, step: int, split: str = "eval") -> dict:
        """Loss and metrics of ``compute`` over every row of ``data`` (rows split across processes)."""
        if data is None:
            return {}
        was = self.model.training
        if self.eval_mode:
            self.model.eval()
        sums = MetricSums()
        rows = list(range(self.acc.process_index, len(data), self.acc.num_processes))
        bs = self.cfg.train.batch_size
        for lo in range(0, len(rows), bs):
            batch = data.collate([data[i] for i in rows[lo: lo + bs]])
            if len(batch) == 0:
                continue
            batch.to(self.acc.device)
            with self.acc.autocast():
                out = self.compute(batch, step, split=split)
            sums.add(out.metrics, out.loss)
        self.model.train(was)
        return sums.means(self.reduce_sum)

    def evaluate(self, step: int) -> dict:
        return self.evaluate_pairs(self.eval_data, step)

    def export(self, out_dir, card: dict | None = None) -> None:
        pass


def gather_for_export(model, acc) -> None:
    """Under FSDP2 the parameters are shards (DTensors). Training is over when this runs: replace every
    sharded parameter by its full tensor (``full_tensor()``, a collective every process enters in the same
    module order; tied parameters stay tied) and give the modules back their own classes, so the export on
    the main process sees an ordinary model (``save_pretrained``, peft/diffusers LoRA state dicts). A no-op
    for DDP and one process; DeepSpeed ZeRO-2 keeps whole parameters."""
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.FSDP:
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    full = {}
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if isinstance(p, DTensor):
                if id(p) not in full:
                    full[id(p)] = torch.nn.Parameter(p.detach().full_tensor(), requires_grad=p.requires_grad)
                mod._parameters[name] = full[id(p)]
        if isinstance(mod, FSDPModule):
            mod.__class__ = next(b for b in type(mod).__bases__ if b is not FSDPModule)


def export_final(recipe, result: TrainResult, acc, summary: bool = False) -> Path:
    """``<output_dir>/final``: the gathered model (``recipe.export``) with the last evaluation in its card, and
    ``summary.json`` when asked -- written to ``final.tmp`` and swapped in whole (a kill or a full disk never
    leaves a partial ``final``); weights that are not finite are never exported."""
    out = Path(result.output_dir) / "final"
    gather_for_export(recipe.model, acc)
    bad = [k for k, p in recipe.policy.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
    if bad:
        raise FloatingPointError(f"refusing to export non-finite weights ({bad[:3]})")
    tmp = out.with_name("final.tmp")
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    recipe.export(tmp, card=eval_summary(result, acc))
    if acc.is_main_process:
        tmp.mkdir(parents=True, exist_ok=True)
        if summary:
            decided = getattr(recipe.policy, "_mmalign_checkpointing", None)  # gradient_checkpointing: auto
            (tmp / "summary.json").write_text(json.dumps({"step": result.step, "eval": result.eval_history,
                                                          "skipped_steps": result.skipped_steps,
                                                          **({"gradient_checkpointing": decided} if decided else {})}))
        replace_dir(tmp, out)
    acc.wait_for_everyone()
    return out


def run_recipe(recipe_cls, cfg, accelerator=None, summary: bool = False, **kwargs) -> TrainResult:
    """Build ``recipe_cls(cfg, accelerator, **kwargs)``, train, export ``<output_dir>/final`` (``export_final``);
    ``result.recipe`` is the trained recipe."""
    acc = accelerator or make_accelerator(cfg.train)
    set_seed(cfg.train.seed)
    recipe = recipe_cls(cfg, acc, **kwargs)
    result = train(recipe, cfg.train, acc, config=to_dict(cfg))
    if recipe.online is not None:  # the guard's best round's weights, the round log and its plot
        result.online = recipe.online.finish()
    export_final(recipe, result, acc, summary)
    result.recipe = recipe
    return result
