"""Checkpoints without pickle: tensors in safetensors, everything else in JSON, written atomically.

Layout of ``<output_dir>/checkpoints/step-00000100/``::

    model.safetensors        trainable weights (LoRA adapters, or the full trained module)
    optimizer.safetensors    optimizer state tensors, flattened as state/<param>/<key>
    rng-<rank>.safetensors   torch CPU (+CUDA) generator states, one file per process
    state.json               step, data position, scheduler, optimizer scalars + param groups,
                             python/numpy RNG, recipe extras (e.g. BCO running mean), config

The directory is written as ``step-...tmp`` and renamed, and ``latest`` (a text file with the
directory name) is replaced atomically, so a crash never leaves a half checkpoint behind ``latest``; pruning
never removes the checkpoint ``latest`` names. Weights that are not finite are never written as a checkpoint.
A run holds ``<output_dir>/.lock`` (``output_lock``) while it writes there, and a fresh run refuses an
output_dir with another run's checkpoints (``check_fresh``) instead of mixing its own among them.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmalign.config import ConfigError
from mmalign.utils import replace_dir  # noqa: F401  (re-exported)

STATE = "state.json"


def _contig(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in d.items()}


def flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state/{pid}/{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, pid, k = key.split("/", 2)
        state.setdefault(int(pid), {})[k] = v
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    py = random.getstate()
    npst = np.random.get_state()
    meta = {"python": [py[0], list(py[1]), py[2]],
            "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict | None):
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["cuda"]))
    if meta:
        v, st, g = meta["python"]
        random.setstate((v, tuple(st), g))
        n = meta["numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def sharded_engine(accelerator) -> bool:
    """FSDP and DeepSpeed shard weights and optimizer state: their own ``save_state`` must write them."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def save_checkpoint(output_dir, step: int, *, model_state, optimizer, scheduler, state: dict, accelerator,
                    keep: int = 2) -> Path:
    """Called on every process (each saves its RNG); the main process writes the rest.

    Under FSDP / DeepSpeed the sharded model and optimizer go through ``accelerator.save_state``
    (safetensors for weights; the engines' own optimizer format) into the same directory; this path is
    exercised on multi-GPU machines only, not by the CPU test-suite."""
    bad = [k for k, v in model_state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise FloatingPointError(f"refusing to save a checkpoint of step {step}: weights {bad[:3]} are not finite")
    root = checkpoint_dir(output_dir)
    name = f"step-{step:08d}"
    final, tmp = root / name, root / (name + ".tmp")
    main = accelerator.is_main_process
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rng_t, rng_meta = rng_state()
    save_file(_contig(rng_t), str(tmp / f"rng-{accelerator.process_index}.safetensors"))
    engine = sharded_engine(accelerator)
    if engine:
        accelerator.save_state(str(tmp / "engine"), safe_serialization=True)
    if main:
        opt_meta = None
        if not engine:
            save_file(_contig(model_state), str(tmp / "model.safetensors"))
            opt_t, opt_meta = flatten_optimizer(optimizer.state_dict())
            save_file(_contig(opt_t), str(tmp / "optimizer.safetensors"))
        payload = dict(state, step=step, optimizer=opt_meta, scheduler=scheduler.state_dict(), rng=rng_meta,
                       engine_state=engine)
        with open(tmp / STATE, "w") as f:
            json.dump(payload, f)
    accelerator.wait_for_everyone()
    if main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / "latest.tmp"
        latest_tmp.write_text(name)
        os.replace(latest_tmp, root / "latest")
        _prune(root, keep, name)
    accelerator.wait_for_everyone()
    return final


def _prune(root: Path, keep: int, latest: str):
    """Keep the ``keep`` highest steps and, whatever else is there, the checkpoint ``latest`` names."""
    if keep <= 0:
        return
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for p in done[:-keep]:
        if p.name != latest:
            shutil.rmtree(p, ignore_errors=True)


def check_fresh(output_dir):
    """A run without ``train.resume`` must not write among another run's checkpoints (pruning by step name would
    delete its own new ones and leave ``latest`` dangling): refuse, naming the way out."""
    root = checkpoint_dir(output_dir)
    old = sorted(p.name for p in root.glob("step-*")) if root.is_dir() else []
    old += sorted(p.name for p in (Path(output_dir) / "online").glob("round-*"))  # an online run's sampled rounds
    if old:
        raise ConfigError(f"train.output_dir {output_dir} holds checkpoints or online rounds of an earlier run "
                          f"({old[-1]}, ...): continue it with train.resume=latest (or auto), or start fresh in "
                          "another train.output_dir")


@contextlib.contextmanager
def output_lock(output_dir, enabled: bool = True):
    """Hold ``<output_dir>/.lock`` (an advisory ``flock``, released by the OS even on ``kill -9``) so that two
    runs never write checkpoints and logs into one folder; a second run fails naming the first one's pid."""
    if not enabled:
        yield
        return
    import fcntl

    Path(output_dir).mkdir(parents=True, exist_ok=True)
    f = open(Path(output_dir) / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise ConfigError(f"train.output_dir {output_dir} is in use by pid {pid} (another run writes there): "
                          "wait for it, or choose another train.output_dir") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def resolve_checkpoint(output_dir, resume: str) -> Path:
    if resume == "latest":
        marker = checkpoint_dir(output_dir) / "latest"
        if not marker.exists():
            raise ConfigError(f"train.resume=latest but {checkpoint_dir(output_dir)} has no checkpoint: use "
                              "train.resume=auto to start fresh when there is none")
        path = checkpoint_dir(output_dir) / marker.read_text().strip()
    else:
        path = Path(resume)
    if not (path / STATE).exists():
        raise ConfigError(f"train.resume: {path} is not a complete checkpoint (no {STATE})")
    return path


def load_checkpoint(path: Path, process_index: int = 0) -> dict:
    path = Path(path)
    with open(path / STATE) as f:
        state = json.load(f)
    rng_file = path / f"rng-{process_index}.safetensors"
    if not rng_file.exists():
        rng_file = path / "rng-0.safetensors"
    if state.get("engine_state"):
        return {"state": state, "model": None, "optimizer": None, "rng": load_file(str(rng_file)),
                "engine_dir": str(path / "engine")}
    return {
        "state": state,
        "model": load_file(str(path / "model.safetensors")),
        "optimizer": unflatten_optimizer(load_file(str(path / "optimizer.safetensors")), state["optimizer"]),
        "rng": load_file(str(rng_file)),
    }
