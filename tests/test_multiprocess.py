"""Two processes (accelerate launch, gloo on CPU) equal one process at the same global batch.

Both runs use OMP_NUM_THREADS=1 (torchrun's default per process): with equal thread counts the
kernels, and therefore the results, are bit-identical. accelerate's ``--cpu`` launcher forks only
through mpirun, so the CPU multi-process launch is ``accelerate launch --multi_gpu --num_processes 2``
on a machine without CUDA (mmalign then runs every process on CPU with gloo).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["train.max_steps=3", "train.eval_every=0", "validation.prompts=[]", "train.optimizer=sgd", "train.lr=1",
          "train.log_every=1", "train.max_grad_norm=null", "train.progress=false"]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    e.pop("CUDA_VISIBLE_DEVICES", None)
    return e


def losses(out: Path):
    return [json.loads(x)["train/loss"] for x in open(out / "metrics.jsonl") if "train/loss" in x]


@pytest.mark.slow  # cost: launches processes / runs a script end to end
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU gloo check")
@pytest.mark.parametrize("config,extra", [("diffusion_dpo", []), ("flow_dpo", []), ("flux_dpo", []),
                                          ("diffusion_dpo", ["model.gradient_checkpointing=auto"])],
                         ids=["diffusion_dpo", "flow_dpo", "flux_dpo", "diffusion_dpo-checkpointing-auto"])
def test_two_processes_equal_one_process(tmp_path, config, extra):
    """Also with gradient_checkpointing auto, the shipped configs' setting: each process decides for itself
    (the fake-tensor forward inside DDP's forward leaves its gradient hooks alone)."""
    one, two = tmp_path / "one", tmp_path / "two"
    config = f"configs/tiny/{config}.yaml"
    r1 = subprocess.run([sys.executable, "-m", "mmalign", "train", config,
                         f"train.output_dir={one}", "train.batch_size=2", "train.grad_accum=2", *COMMON, *extra],
                        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                         "--main_process_port", str(free_port()), "-m", "mmalign", "train",
                         config, f"train.output_dir={two}", "train.batch_size=2", *COMMON, *extra],
                        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "2 x 1 accum x 2 proc" in r2.stdout  # really two processes
    if extra:
        assert "gradient_checkpointing auto: off" in r1.stdout and "gradient_checkpointing auto: off" in r2.stdout
    assert losses(one) == losses(two)
    a = load_file(str(one / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(two / "final" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.isfinite(a[k]).all(), k  # NaN != NaN: equality means something only on finite weights
        assert torch.equal(a[k], b[k]), k
    assert losses(one)[-1] != losses(one)[0]  # and training did move
