"""``gradient_checkpointing: auto``: recompute activations in the backward pass only where the step would not fit
in memory without it.

Gradient checkpointing trades a forward pass for memory: the policy's forward keeps only each block's input and
the backward runs the block again. The diffusers training scripts and TRL leave the choice to a flag that users
set to fit a card; when the step fits anyway, the recompute is a quarter or more of the step's work for nothing
(a Diffusion-DPO LoRA step is three forwards and a backward; the recompute adds a fourth forward).

``auto_checkpointing(module, enable, disable)`` decides at the module's first forward under autograd (the first
trained step; forwards under ``no_grad`` -- a reference forward, sampling -- do not count), with that call's own
inputs: it runs the same forward once more on fake tensors (``FakeTensorMode``: shapes only, no memory, no
arithmetic), counts the bytes of the tensors autograd would save for the backward without checkpointing, and
compares them with the memory the device has left (``available_bytes``)::

    need = 1.25 x saved activations + 3 x the outputs' bytes in fp32 + 3 x the trainable parameters' bytes
    (outputs: a language model's logits, which the loss upcasts, log-softmaxes and differentiates outside the
    forward -- small for a denoiser; trainable: their gradients and two AdamW states, not allocated yet)
    checkpointing off  if  need <= 0.8 x available, else on

The factors leave room for what the count does not see: the backward's gradient buffers, the allocator's
fragmentation, the no-grad reference forward's transient activations. The decision is made once, by each
process for its own device (what a step needs does not change between steps: same shapes), printed, and kept in
``module._mmalign_checkpointing``. Where the fake forward fails or the device's free memory cannot be read,
checkpointing stays on -- the choice that fits.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch
from torch.utils import _pytree as pytree

ACTIVATION_FACTOR, OUTPUT_FACTOR, STATE_FACTOR, BUDGET_FRACTION = 1.25, 3, 3, 0.8


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def fake_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int]:
    """One ``module(*args, **kwargs)`` without checkpointing, on fake tensors (nothing computed or allocated):
    (the bytes autograd saves for the backward, the floating outputs' elements x 4 bytes). Each saved storage
    once; parameters, buffers and the inputs are not counted (they exist already), views of them neither."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # only this count needs fake tensors

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    seen, total = set(), [0]

    def pack(x):
        key = _storage_key(x)
        if key not in seen:
            seen.add(key)
            total[0] += x.untyped_storage().nbytes()
        return x

    with mode:  # fakes of the weights and inputs, their storages known (so not counted)
        state = {k: mode.from_tensor(v) for k, v in {**dict(module.named_parameters(remove_duplicate=False)),
                                                      **dict(module.named_buffers(remove_duplicate=False))}.items()}
        args, kwargs = pytree.tree_map_only(torch.Tensor, mode.from_tensor, (args, kwargs))
        seen.update(_storage_key(t) for t in [*state.values(), *pytree.tree_leaves((args, kwargs))]
                    if isinstance(t, torch.Tensor))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = torch.func.functional_call(module, state, args, kwargs, tie_weights=False, strict=False)
    leaves = pytree.tree_leaves(out)
    outputs = sum(4 * t.numel() for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point())
    return total[0], outputs


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory the device has left for this process: CUDA's free memory plus what PyTorch's caching allocator holds
    unused; on CPU the kernel's ``MemAvailable`` shared among the node's processes (``LOCAL_WORLD_SIZE``). None
    where it cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return None
        return kb * 1024 // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return None


def checkpointing_needed(activations: int, trainable: int, available: Optional[int], outputs: int = 0) -> bool:
    """The rule of the module docstring: True (keep checkpointing) unless the step fits with room to spare."""
    if available is None:
        return True
    need = ACTIVATION_FACTOR * activations + OUTPUT_FACTOR * outputs + STATE_FACTOR * trainable
    return need > BUDGET_FRACTION * available


def auto_checkpointing(module: torch.nn.Module, enable: Callable[[], None], disable: Callable[[], None],
                       report: Callable[[str], None] = print,
                       available: Optional[Callable[[torch.device], Optional[int]]] = None,
                       lever: Optional[tuple[str, int]] = None):
    """Decide gradient checkpointing for ``module`` at its first forward under autograd (module docstring):
    ``enable()`` or ``disable()`` is called from a forward pre-hook, before any block runs, so that forward
    already follows the decision. Until then checkpointing is on. ``available``: the free-memory reading
    (``available_bytes``). ``lever``: (a setting, the bytes it would free), named in the report when checkpointing
    stays on for memory -- with whether those bytes would let it go off."""
    enable()
    handle = None

    def decide(mod, args, kwargs):
        if not torch.is_grad_enabled():
            return None
        handle.remove()
        p = next(mod.parameters())
        trainable = sum(q.numel() * 4 for q in mod.parameters() if q.requires_grad)
        disable()  # the count is of the forward without checkpointing
        try:
            (acts, outs), error = fake_forward(mod, args, kwargs), None
        except Exception as e:  # noqa: BLE001 - any failure of the fake forward: keep the choice that fits
            acts = outs = None
            error = f"{type(e).__name__}: {e}"
        free = (available or available_bytes)(p.device)
        on = error is not None or checkpointing_needed(acts, trainable, free, outs)
        (enable if on else disable)()
        mb = (lambda b: None if b is None else round(b / 2**20))
        mod._mmalign_checkpointing = {"on": on, "activations_mb": mb(acts), "outputs_mb": mb(outs),
                                      "trainable_mb": mb(trainable), "available_mb": mb(free), "error": error}
        why = (f"the fake forward failed ({error.splitlines()[0][:200]})" if error is not None else
               f"free memory unknown on {p.device.type}" if free is None else
               f"{mb(acts)} MB of activations + {mb(OUTPUT_FACTOR * outs)} MB for the outputs' loss + "
               f"{mb(STATE_FACTOR * trainable)} MB of gradients and optimizer states against {mb(free)} MB free "
               f"on {p.device.type}")
        if on and error is None and free is not None and lever is not None:
            enough = not checkpointing_needed(acts, trainable, free + lever[1], outs)
            why += f"; {lever[0]} would free {mb(lever[1])} MB{', enough to turn it off' if enough else ''}"
            mod._mmalign_checkpointing["lever"] = {"setting": lever[0], "frees_mb": mb(lever[1]), "enough": enough}
        report(f"gradient_checkpointing auto: {'on' if on else 'off'} ({why})")
        return None

    handle = module.register_forward_pre_hook(decide, with_kwargs=True)
    return handle
