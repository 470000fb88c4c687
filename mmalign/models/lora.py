"""peft LoRA layers with fewer dispatched ops: the low-rank term as one autograd function.

LoRA (Hu et al. 2021, eq. 3) adds ``scaling * B A x`` to a frozen layer's ``W0 x``. peft computes the term as two
``nn.Linear`` calls, a multiplication and an addition, plus (with fp32 LoRA weights on a bf16 base under autocast)
a cast of x to fp32 that autocast casts straight back: per layer ~40 dispatched aten ops forward and ~70 backward,
most of them views, transposes and casts. On a GPU the step is host-bound (docs/performance.md: ~6,200 matmuls per
SDXL step), so these are time. ``fuse_lora_layers`` gives each peft LoRA ``Linear`` a forward that still calls the
base layer as peft does (its hooks, storage casts and quantisation untouched) and computes the term with
``LoraDelta``: the same matmuls, on the same operands in the same order, with a hand-written backward -- so the
loss, the input's gradient and every LoRA gradient are the same to the bit as peft's, fp32 or under bf16 autocast,
with or without gradient checkpointing (``tests/test_lora.py``). Anything else (adapters disabled or merged, several
active adapters, DoRA and other variants, LoRA dropout or bias, hooks on the LoRA matrices -- e.g. DeepSpeed ZeRO-3's
gathering --, an input whose dtype peft would cast outside autocast) runs peft's own forward.
"""
from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn.modules import module as torch_module


class LoraDelta(torch.autograd.Function):
    """``scaling * (x A^T) B^T`` over the last dim of ``x`` (all leading dims folded into rows): eq. 3's ``B A x``
    term. Under autocast the operands are cast to the autocast dtype, as autocast casts peft's ``nn.Linear`` calls.
    The backward: ``g_s = scaling g``, ``g_u = g_s B``; ``dx = g_u A``, ``dA = g_u^T x``, ``dB = g_s^T u`` -- the
    products autograd forms for peft's two linears, in its layouts (so the same bits)."""

    @staticmethod
    def forward(ctx, x, a, b, scaling: float):
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x2, ac, bc = _as(_rows(x), dt), _as(a, dt), _as(b, dt)
        u = torch.mm(x2, ac.t())
        out = torch.mm(u, bc.t()) * scaling
        ctx.save_for_backward(x2, ac, bc, u)
        ctx.scaling, ctx.dtypes = scaling, (x.dtype, a.dtype, b.dtype)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x2, ac, bc, u = ctx.saved_tensors
        gs = _rows(g) * ctx.scaling
        gu = torch.mm(gs, bc)
        dx = da = db = None
        if ctx.needs_input_grad[0]:
            dx = _as(torch.mm(gu, ac).view(*g.shape[:-1], ac.shape[1]), ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            da = _as(torch.mm(gu.t(), x2), ctx.dtypes[1])
        if ctx.needs_input_grad[2]:
            db = _as(torch.mm(gs.t(), u), ctx.dtypes[2])
        return dx, da, db, None


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a matrix of its last dim's rows (a view when contiguous: one op, not reshape's two)."""
    return t.view(-1, t.shape[-1]) if t.is_contiguous() else t.reshape(-1, t.shape[-1])


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without dispatching anything when it has it already."""
    return t if t.dtype == dtype else t.to(dtype)


def _hooked(m: nn.Module) -> bool:
    """Hooks that calling ``m`` would run and the fused term would not: its own, or global module hooks."""
    return bool(m._forward_pre_hooks or m._forward_hooks or m._backward_hooks or m._backward_pre_hooks
                or torch_module._global_forward_pre_hooks or torch_module._global_forward_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)


def _fused_forward(self, x, *args, **kwargs):
    """peft's ``Linear.forward`` for one plain active adapter: ``base_layer(x) + LoraDelta(x, A, B, scaling)``;
    every other case goes to peft's own forward (module docstring)."""
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if (args or kwargs or name not in self.lora_A or self.disable_adapters or self.merged
            or name in getattr(self, "lora_variant", {}) or not isinstance(self.lora_dropout[name], nn.Identity)):
        return self._peft_forward(x, *args, **kwargs)
    la, lb = self.lora_A[name], self.lora_B[name]
    if (la.bias is not None or lb.bias is not None or _hooked(la) or _hooked(lb)
            or not (torch.is_autocast_enabled(x.device.type) or x.dtype == la.weight.dtype)):
        return self._peft_forward(x, *args, **kwargs)
    result = self.base_layer(x)
    return result + LoraDelta.apply(x, la.weight, lb.weight, self.scaling[name])


def fuse_lora_layers(module: nn.Module) -> int:
    """Give every peft LoRA ``Linear`` of ``module`` the fused forward (module docstring); returns how many."""
    from peft.tuners.lora.layer import Linear  # peft: imported by whoever made the LoRA layers already

    n = 0
    for mod in module.modules():
        if isinstance(mod, Linear) and not hasattr(mod, "_peft_forward"):
            mod._peft_forward = mod.forward
            mod.forward = types.MethodType(_fused_forward, mod)
            n += 1
    return n
