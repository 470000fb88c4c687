"""Small shared helpers on the ground floor: keyed random generators, console tables, folders written whole,
the CPU heap kept between steps."""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
from pathlib import Path

import torch


def example_generator(seed: int, step: int, row: int, salt: int = 0) -> torch.Generator:
    """A CPU generator keyed by (seed, step, dataset row): the same example gets the same noise on
    any number of processes and after a resume."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 7_919 + row * 104_729 + salt * 15_485_863) % (2**63 - 1))
    return g


def format_table(header: list[str], rows: list[list]) -> str:
    rows = [[str(x) for x in r] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths)).rstrip(),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(out)


def print_table(header: list[str], rows: list[list]):
    print(format_table(header, rows), flush=True)


def replace_dir(tmp: Path, final: Path):
    """Put a fully written folder ``tmp`` in place of ``final``: a crash at any point leaves either the old
    ``final`` or the new one, never a partial one (at worst a ``.old`` / ``.tmp`` folder beside it)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(path: str | Path):
    """``with atomic_folder(path) as tmp:`` fill ``tmp``; on success it replaces ``path`` whole (``replace_dir``),
    on an error nothing at ``path`` changes."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    replace_dir(tmp, path)


def keep_cpu_heap() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel; returns whether
    it did (False off glibc, or with ``MMALIGN_KEEP_CPU_HEAP=0``).

    A training step on CPU frees and re-allocates the same large buffers every step (activations, gradients,
    oneDNN's convolution workspaces, upcast weights). glibc serves every block above its mmap threshold (at most
    32 MB) with a fresh ``mmap`` and unmaps it on free, so the next step pays a page fault and a kernel
    zero-fill per 4 KiB page again. Measured on the 2-core bench machine (SD1.5 UNet LoRA DPO step,
    ``scripts/bench_diffusion_dpo.py``): a third to a half of the step was kernel time. ``M_MMAP_MAX = 0``
    serves every block from the heap and ``M_TRIM_THRESHOLD = -1`` never shrinks it (mallopt(3)), so freed blocks are reused:
    the process's peak stays the same high-water mark, and it is not returned to the system until exit
    (what PyTorch's recommended CPU allocators, jemalloc / tcmalloc, also do). GPU memory is unaffected (the
    CUDA caching allocator already reuses its blocks)."""
    if os.environ.get("MMALIGN_KEEP_CPU_HEAP", "1") == "0":
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, -1))
