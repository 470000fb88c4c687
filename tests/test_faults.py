"""Fault injection: SIGKILL a training run at random moments -- including in the middle of checkpoint
writes -- 20 times; every relaunch (``train.resume=auto``) must start from an intact checkpoint and the
run must finish bit-identical to an uninterrupted one."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "fault_driver.py"
STEPS = 300
KILLS = 20


def launch(out: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(DRIVER), str(out), str(STEPS)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def writing(out: Path) -> bool:
    root = ckpt.checkpoint_dir(out)
    return root.exists() and any(p.name.endswith(".tmp") for p in root.iterdir())


@pytest.mark.slow
def test_sigkill_20_times_then_resume_equals_uninterrupted(tmp_path):
    clean = tmp_path / "clean"
    p = launch(clean)
    assert p.wait(timeout=600) == 0, p.stdout.read()[-3000:]
    want = load_file(str(clean / "final.safetensors"))

    out, rng = tmp_path / "killed", random.Random(0)
    kills, during_write, resumed_from = 0, 0, []
    while True:
        (out / "alive").unlink(missing_ok=True)
        p = launch(out)
        if kills < KILLS:
            target_write = kills % 2 == 1  # every other kill lands inside a checkpoint write
            while p.poll() is None and not (out / "alive").exists():  # until this launch's first step
                time.sleep(0.005)
            if target_write:  # let a random number of writes complete, then kill in the middle of the next
                skip, seen, was = rng.randint(1, 4), 0, False
                while p.poll() is None:
                    now = writing(out)
                    if now and not was:
                        seen += 1
                        if seen > skip:
                            break
                    was = now
                    time.sleep(0.0002)
            else:
                deadline = time.time() + rng.uniform(0.0, 0.5)
                while p.poll() is None and time.time() < deadline:
                    time.sleep(0.005)
            if p.poll() is None:
                during_write += writing(out)
                p.send_signal(signal.SIGKILL)
                p.wait()
                kills += 1
                log = p.stdout.read()
                resumed_from += [line for line in log.splitlines() if line.startswith("resumed from")]
                # what survived must be an intact checkpoint (or nothing yet)
                marker = ckpt.checkpoint_dir(out) / "latest"
                if marker.exists():
                    ckpt.load_checkpoint(ckpt.resolve_checkpoint(out, "latest"))
                continue
        log = p.communicate(timeout=600)[0]
        assert p.returncode == 0, log[-3000:]
        resumed_from += [line for line in log.splitlines() if line.startswith("resumed from")]
        break
    assert kills == KILLS and during_write >= 5, (kills, during_write)
    assert len(resumed_from) >= KILLS - 2, log[-2000:]  # nearly every relaunch resumed (not one killed before its first save)
    got = load_file(str(out / "final.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
