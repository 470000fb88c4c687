"""The reference model, one implementation for every recipe (text, VLM, captioner, diffusion).

Four kinds, of which the first three give the same loss (tested for every recipe):

* ``copy``        a frozen deep copy of the initial policy (full fine-tuning); optionally cast to a half
                  dtype and, on CUDA, offloaded to CPU layer by layer
* ``peft``        the policy itself with its LoRA adapters disabled (one model in memory) -- peft
                  ``PeftModel``s (text) and diffusers / transformers models with ``add_adapter`` alike
* ``precomputed`` scores computed once before training with the initial policy and looked up by
                  dataset row (``tables[split][name][rows]``)
* ``none``        reference-free losses (SimPO, PRO): no reference forward at all

``mode`` says how the reference computes: ``"eval"`` (text: dropout off via eval mode) or ``"policy"``
(diffusion: the policy's own train mode with every dropout at 0 -- diffusers' ResnetBlock2D takes a
different, bit-different kernel path in eval mode, enough to move the step-0 loss off ln 2 at beta 5000).
``detach`` is an optional extra context for parts of the policy the reference must not use (PPD's user
branch).
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable

import torch

Tensor = torch.Tensor
KINDS = ("copy", "peft", "precomputed", "none")


def freeze_like_policy(module):
    """Frozen, computing exactly like the policy: train mode with every dropout at 0."""
    module.requires_grad_(False)
    module.train()
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return module


@contextlib.contextmanager
def adapters_disabled(model):
    """LoRA off for the duration: peft ``PeftModel.disable_adapter()`` or the adapter mixin of diffusers /
    transformers models (``disable_adapters`` / ``enable_adapters``); a model without adapters as is."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    elif getattr(model, "_hf_peft_config_loaded", False):
        model.disable_adapters()
        try:
            yield
        finally:
            model.enable_adapters()
    else:
        yield


def resolve_kind(kind: str, lora: bool, needs_reference: bool = True) -> str:
    """``auto`` -> ``peft`` with LoRA, else ``copy``; reference-free losses get ``none``."""
    if not needs_reference:
        return "none"
    if kind == "auto":
        return "peft" if lora else "copy"
    if kind == "peft" and not lora:
        raise ValueError("model.reference=peft needs model.lora")
    return kind


class Reference:
    def __init__(self, kind: str, policy, mode: str = "eval", dtype: torch.dtype | None = None,
                 offload: bool = False, detach: Callable | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown reference kind {kind!r}; known: {list(KINDS)}")
        if mode not in ("eval", "policy"):
            raise ValueError(f"reference mode must be eval or policy, got {mode!r}")
        self.kind, self.policy, self.mode, self.detach = kind, policy, mode, detach
        self.model = None
        self.tables: dict[str, dict[str, Tensor]] = {}
        if kind == "copy":
            m = copy.deepcopy(policy)
            if mode == "eval":
                m.eval().requires_grad_(False)
            else:
                freeze_like_policy(m)
            if dtype is not None and dtype != torch.float32:
                m.to(dtype=dtype)
            if offload and torch.cuda.is_available():
                from accelerate import cpu_offload

                cpu_offload(m, execution_device=torch.device("cuda"))
            self.model = m

    @contextlib.contextmanager
    def context(self):
        """Yields the module to run for reference scores, under no_grad (``copy``: the frozen copy; ``peft``
        and ``precomputed`` (when building its tables): the policy with adapters disabled)."""
        if self.kind == "none":
            raise RuntimeError("this loss is reference-free: there is no reference model")
        m = self.model if self.kind == "copy" else self.policy
        with torch.no_grad(), contextlib.ExitStack() as stack:
            if self.kind != "copy":
                stack.enter_context(adapters_disabled(m))
                if self.mode == "eval":
                    was = m.training
                    m.eval()
                    stack.callback(m.train, was)
            if self.detach is not None:
                stack.enter_context(self.detach(m))
            yield m

    def store(self, split: str, tables: dict[str, Tensor]):
        """Keep precomputed reference scores for ``split`` (each tensor indexed by dataset row first)."""
        self.tables[split] = {k: v.cpu() for k, v in tables.items()}

    def lookup(self, split: str, index: Tensor, *rest) -> dict[str, Tensor]:
        """Rows ``index`` (and further indices, e.g. the noise draw) of every precomputed table of ``split``."""
        if split not in self.tables:
            raise RuntimeError(f"precomputed reference has no {split!r} table; call store() first")
        key = (index.cpu(), *rest)
        return {k: v[key].to(index.device) for k, v in self.tables[split].items()}
