"""Frozen weights stored below the compute precision (layer-wise casting), safe under LoRA and gradient
checkpointing.

``store_frozen(module, torch.bfloat16)`` keeps every frozen ``nn.Linear`` / ``nn.Conv2d`` weight of ``module`` in
the storage dtype -- bf16, fp16, or fp8 (``float8_e4m3fn``, with a scale per output channel) -- and runs each of those layers in the compute
dtype: the layer's forward upcasts its weight just for that call, and its backward upcasts it again to give the
input's gradient. Nothing in compute precision is kept between the two, so the frozen base costs its storage
bytes (half of fp32 for bf16, a quarter for fp8) plus one layer's upcast copy at a time (on CPU one reused
buffer the size of the largest layer: ``_scratch``). Trainable parameters
(the LoRA matrices) are not touched and stay fp32.

Why not diffusers' ``enable_layerwise_casting``: its hook casts a layer's weights to the compute dtype in place
before the layer's forward and back to the storage dtype after it (``module.to``). Without checkpointing that
trains correctly (autograd keeps the compute-dtype tensor it saved; ``tests/test_storage.py`` checks it equals
the rounded fp32 model). Under gradient checkpointing (non-reentrant, as diffusers enables it) the recompute's
saved weights are the layer's parameters themselves, which the after-forward cast has turned back to the storage
dtype by the time they are checked and used: torch refuses with a ``CheckpointError`` (saved float32, recomputed
bfloat16, naming the conv weights). Here the upcast copy is a new tensor made inside a custom autograd function
that saves only the stored weight, so the forward, a recompute and the backward all see what they expect.
"""
from __future__ import annotations

import threading
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float8_e4m3fn": torch.float8_e4m3fn}


def upcast(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The weight a stored layer computes with: the stored values in ``dtype``, times the per-output-channel
    scale for fp8 storage. On CPU it is written into one reused buffer (``_scratch``): valid until the next
    upcast, which is all the two autograd functions below need (each uses it for one op and drops it)."""
    if weight.dtype == dtype and scale is None:
        return weight
    if not _reuse_scratch(weight):
        w = weight.to(dtype)
        return w if scale is None else w * scale.to(dtype)
    w = _scratch(weight.numel(), dtype).view(weight.shape).copy_(weight)
    return w if scale is None else w.mul_(scale.to(dtype))


_SCRATCH: dict[tuple[int, torch.dtype], torch.Tensor] = {}


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype``, with no op dispatched where it is already (a frozen conv in its own dtype)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _reuse_scratch(weight: torch.Tensor) -> bool:
    """Eager CPU calls only: not under autograd (the result would be saved past the next upcast), torch.compile,
    or a dispatch mode such as the fake tensors that decide gradient checkpointing (a buffer made there is fake)."""
    return (weight.device.type == "cpu" and type(weight) in (torch.Tensor, nn.Parameter)
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling() and not is_in_torch_dispatch_mode())


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """``numel`` elements of this thread's upcast buffer for ``dtype``, grown to the largest weight seen (59 MB
    for SD's 1280-channel 3x3 convs in fp32). Why: with a fresh tensor per upcast, CPU training with the heap kept
    (``mmalign.utils.keep_cpu_heap``) peaked ~0.9 GB higher -- `scripts/bench_diffusion_dpo.py --overrides
    model.storage_dtype=bfloat16`, SD1.5 size: 4070 -> 3117 MB at steady state, 4504 -> 3615 MB on the first pass
    (2026-12-06, 2-core Zen 5), probably freed copies of one size leaving holes the next size does not fit; the
    step time did not move. A GPU's caching allocator already reuses its blocks, so it is CPU only."""
    key = (threading.get_ident(), dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        buf = _SCRATCH[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def quantise(weight: torch.Tensor, storage: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``weight`` in ``storage``: a plain cast for 16-bit dtypes; for fp8 (e4m3: 3 mantissa bits, largest 448) a
    scale per output channel, absmax / 448, so each row uses the format's full range -- a plain cast would flush
    every |w| < 2^-9 (about 0.002, common in large models' weights) to zero or to a coarse subnormal."""
    if storage.itemsize != 1:
        return weight.to(storage), None
    dims = tuple(range(1, weight.dim()))
    scale = weight.float().abs().amax(dim=dims, keepdim=True).clamp_min(1e-30) / torch.finfo(storage).max
    return (weight.float() / scale).to(storage), scale


PIECE = 1 << 20
"""Elements per piece of a large stored weight's CPU upcast (4 MB in fp32): see ``_pieces``."""


def _pieces(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype,
            groups: int = 1) -> list[slice] | None:
    """Output-channel slices of ``weight`` of at most ``PIECE`` elements each, where a stored layer runs piece by
    piece; None where it runs whole. Why: a whole upcast of SD's largest convs (1280 x 1280 x 3 x 3: 59 MB in
    fp32) leaves the cache before the conv reads it back; one piece stays in cache between the two. Measured,
    the 0.86B frozen weights of SD1.5's UNet upcast once in 0.13 s whole and 0.07 s in 1M-element pieces
    (2-core Zen 5). Only where the upcast uses the CPU buffer (``_reuse_scratch``) and the layer is not grouped."""
    if (groups != 1 or (weight.dtype == dtype and scale is None) or weight.numel() <= PIECE
            or not _reuse_scratch(weight)):
        return None
    rows = max(1, PIECE // weight[0].numel())
    return [slice(i, i + rows) for i in range(0, weight.shape[0], rows)]


def _part(t: torch.Tensor | None, s: slice) -> torch.Tensor | None:
    return None if t is None else t[s]


def _summed(parts) -> torch.Tensor:
    """The sum of the input-gradient parts of the pieces, each added as it is made (each upcast reuses the buffer
    the one before used, so the parts must be made one at a time: ``parts`` is a generator)."""
    total = None
    for part in parts:
        total = part if total is None else total.add_(part)
    return total


class _StoredLinear(torch.autograd.Function):
    """y = x W^T + b with W stored low and upcast to ``dtype`` for this call only; W is frozen, so the backward
    gives only dL/dx = dL/dy W (W upcast again). Large W on CPU: by output rows (``_pieces``), the outputs
    concatenated and the input's gradient summed over the pieces."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, dtype):
        ctx.save_for_backward(weight, scale)
        pieces = _pieces(weight, scale, dtype)
        if pieces is None:
            return F.linear(x, upcast(weight, scale, dtype), _cast(bias, dtype))
        b = _cast(bias, dtype)
        return torch.cat([F.linear(x, upcast(weight[s], _part(scale, s), dtype), _part(b, s)) for s in pieces], -1)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        pieces = _pieces(weight, scale, grad.dtype)
        if pieces is None:
            return grad @ upcast(weight, scale, grad.dtype), None, None, None, None
        gx = _summed(grad[..., s] @ upcast(weight[s], _part(scale, s), grad.dtype) for s in pieces)
        return gx, None, None, None, None


class _StoredConv2d(torch.autograd.Function):
    """A frozen conv2d (zero padding) with its weight stored low; the backward is aten's ``convolution_backward``
    for the input only (``torch.nn.grad.conv2d_input``, what autograd runs for a conv whose weight is frozen)."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias, dtype, stride, padding, dilation, groups):
        ctx.save_for_backward(weight, scale)
        ctx.conf = (x.shape, stride, padding, dilation, groups)
        b = _cast(bias, dtype)
        pieces = _pieces(weight, scale, dtype, groups)
        if pieces is None:
            return F.conv2d(x, upcast(weight, scale, dtype), b, stride, padding, dilation, groups)
        return torch.cat([F.conv2d(x, upcast(weight[s], _part(scale, s), dtype), _part(b, s), stride, padding,
                                   dilation) for s in pieces], 1)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        shape, stride, padding, dilation, groups = ctx.conf
        if not ctx.needs_input_grad[0]:
            return (None,) * 9
        pieces = _pieces(weight, scale, grad.dtype, groups)
        if pieces is None:
            return (torch.nn.grad.conv2d_input(shape, upcast(weight, scale, grad.dtype), grad, stride, padding,
                                               dilation, groups),) + (None,) * 8
        gx = _summed(torch.nn.grad.conv2d_input(shape, upcast(weight[s], _part(scale, s), grad.dtype), grad[:, s],
                                                stride, padding, dilation) for s in pieces)
        return (gx,) + (None,) * 8


def _linear_forward(self, x):
    return _StoredLinear.apply(x.to(self.compute_dtype), self.weight, self.weight_scale, self.bias, self.compute_dtype)


def _conv_forward(self, x):
    return _StoredConv2d.apply(x.to(self.compute_dtype), self.weight, self.weight_scale, self.bias, self.compute_dtype,
                               self.stride, self.padding, self.dilation, self.groups)


def _frozen_conv_forward(self, x):
    return _StoredConv2d.apply(x, self.weight, None, self.bias, self.weight.dtype, self.stride, self.padding,
                               self.dilation, self.groups)


def frozen_convs_save_no_input(module: nn.Module) -> int:
    """Run the frozen ``nn.Conv2d`` layers of ``module`` (not stored low) through ``_StoredConv2d`` in their own
    dtype. Why: autograd's convolution saves its input for the weight's gradient even when the weight is frozen
    (``F.linear`` does not: its saved input depends on the weight requiring grad), so a LoRA run kept one
    activation per frozen conv that its backward never reads. This saves only the weight; the input's gradient is
    the same ``convolution_backward`` call, bit-equal (tests/test_storage.py). Measured on the fake count of
    ``mmalign.models.checkpointing``: SD1.5, 512 px, 1 pair -- 3047 -> 2595 MB of saved activations. Nothing to
    gain under torch.compile, whose partitioner saves only what the backward reads. Returns how many layers."""
    n = 0
    for mod in module.modules():
        if type(mod) is nn.Conv2d and storable(mod) and not hasattr(mod, "compute_dtype"):
            mod.forward = types.MethodType(_frozen_conv_forward, mod)
            n += 1
    return n


def storable(mod: nn.Module) -> bool:
    """A plain ``nn.Linear`` or zero-padded ``nn.Conv2d`` (not a subclass: peft's LoRA layers wrap theirs) whose
    weights are all frozen."""
    if type(mod) not in (nn.Linear, nn.Conv2d):
        return False
    params = [p for p in (mod.weight, mod.bias) if p is not None]
    if any(p.requires_grad for p in params):  # trainable (a full fine-tune, a LoRA matrix): left alone
        return False
    return type(mod) is nn.Linear or (mod.padding_mode == "zeros" and not isinstance(mod.padding, str))


def store_frozen(module: nn.Module, storage: torch.dtype, compute: torch.dtype = torch.float32) -> int:
    """Store the frozen Linear / Conv2d weights of ``module`` in ``storage`` (``quantise``) and compute them in
    ``compute`` (module docstring). Call after the adapters are added and ``requires_grad`` is set. Returns how
    many weights (elements) it stored low. Biases, norms and embeddings stay as they are: they are small."""
    n = 0
    for mod in module.modules():
        if not storable(mod):
            continue
        stored, scale = quantise(mod.weight.data, storage)
        mod.weight.data = stored
        mod.register_buffer("weight_scale", scale, persistent=False)  # None for 16-bit storage
        n += stored.numel()
        mod.compute_dtype = compute
        mod.forward = types.MethodType(_linear_forward if isinstance(mod, nn.Linear) else _conv_forward, mod)
    _own_memory(module, storage)
    _report_compute_dtype(module, compute)
    return n


def _own_memory(module: nn.Module, storage: torch.dtype):
    """Copy the tensors left as they were (norms, embeddings: a few MB) into memory of their own. Weights loaded
    from a safetensors file live in one memory mapping of the whole file: one of them left alive keeps every
    page of the file read so far resident -- measured: the fp32 file (3.3 GB, SD1.5) stayed resident
    beside its 1.6 GB bf16 copy."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.dtype != storage:  # each a slice of the file's mapping, which lives while any slice does
            t.data = t.data.clone()


def _report_compute_dtype(module: nn.Module, compute: torch.dtype):
    """diffusers models report the dtype of their first floating parameter (``model.dtype``), which pipelines
    cast their inputs to; with the weights stored low that would be the storage dtype. Report the compute dtype
    instead, from a subclass made once per model class (the class name, and so the saved config, are unchanged)."""
    module._mmalign_compute_dtype = compute
    cls = type(module)
    if isinstance(getattr(cls, "dtype", None), property) and not getattr(cls, "_mmalign_stored", False):
        module.__class__ = _STORED_CLASSES.setdefault(cls, type(cls.__name__, (cls,), {
            "_mmalign_stored": True, "__module__": cls.__module__,
            "dtype": property(lambda self: self._mmalign_compute_dtype)}))


_STORED_CLASSES: dict[type, type] = {}
