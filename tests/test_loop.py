"""The shared training loop: reduction invariance, NaN policy, interrupt + resume, checkpoints."""
import json
import math

import pytest
import torch
from accelerate import Accelerator

from mmalign.config import ConfigError
from mmalign.train import checkpoint as ckpt
from mmalign.train.sections import TrainSection
from mmalign.train.loop import NonFiniteLossError, ResumableBatches, train
from tests.toy_recipe import ToyRecipe


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=4, batch_size=8, lr=0.1, optimizer="sgd", log_every=1,
                report_to=["jsonl"], progress=False, max_grad_norm=None)
    base.update(kw)
    return TrainSection(**base)


def weights(recipe):
    m = recipe.model.module if hasattr(recipe.model, "module") else recipe.model
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_batch8_accum1_equals_batch1_accum8(tmp_path):
    """The shared reduction makes the applied gradient the mean over every example of the step."""
    a, b = ToyRecipe(), ToyRecipe()
    train(a, cfg(tmp_path / "a", batch_size=8, grad_accum=1, max_steps=3), Accelerator())
    train(b, cfg(tmp_path / "b", batch_size=1, grad_accum=8, max_steps=3), Accelerator())
    torch.testing.assert_close(weights(a), weights(b), rtol=1e-5, atol=1e-6)
    # and the check is sensitive: a different global batch gives different weights
    c = ToyRecipe()
    train(c, cfg(tmp_path / "c", batch_size=1, grad_accum=4, max_steps=3), Accelerator())
    assert not torch.allclose(weights(a), weights(c), atol=1e-4)


def test_sampler_is_sharded_and_resumable():
    full = ResumableBatches(20, 4, world=1, seed=3)
    it = iter(full)
    first = [next(it) for _ in range(7)]  # crosses an epoch boundary (5 batches per epoch)
    r0 = ResumableBatches(20, 2, world=2, rank=0, seed=3)
    r1 = ResumableBatches(20, 2, world=2, rank=1, seed=3)
    i0, i1 = iter(r0), iter(r1)
    for b in first:
        assert next(i0) + next(i1) == b  # two ranks together see the single-process global batch
    resumed = iter(ResumableBatches(20, 4, world=1, seed=3, start=4))
    assert [next(resumed) for _ in range(3)] == first[4:7]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ResumableBatches(3, 4)


def test_interrupt_then_resume_equals_uninterrupted(tmp_path):
    ref = ToyRecipe()
    train(ref, cfg(tmp_path / "full", max_steps=6, optimizer="adamw", lr=0.05), Accelerator())

    r1 = ToyRecipe()

    def stop_at_3(step, rec):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(r1, cfg(tmp_path / "run", max_steps=6, optimizer="adamw", lr=0.05), Accelerator(), on_step=stop_at_3)
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text()
    assert latest == "step-00000003"
    r2 = ToyRecipe(seed=0)
    # perturb the fresh model so only a correct restore can match
    with torch.no_grad():
        for p in r2.model.parameters():
            p.add_(1.0)
    res = train(r2, cfg(tmp_path / "run", max_steps=6, optimizer="adamw", lr=0.05, resume="latest"), Accelerator())
    assert res.step == 6
    assert torch.equal(weights(ref), weights(r2))


def test_checkpoint_is_safetensors_json_and_atomic(tmp_path):
    r = ToyRecipe()
    train(r, cfg(tmp_path, max_steps=4, save_every=2, keep_checkpoints=1, optimizer="adamw"), Accelerator())
    root = tmp_path / "checkpoints"
    dirs = sorted(p.name for p in root.iterdir())
    assert dirs == ["latest", "step-00000004"]  # pruned to 1, no .tmp left
    files = sorted(p.name for p in (root / "step-00000004").iterdir())
    assert files == ["model.safetensors", "optimizer.safetensors", "rng-0.safetensors", "state.json"]
    state = json.loads((root / "step-00000004" / "state.json").read_text())
    assert state["step"] == 4 and state["consumed_batches"] == 4
    loaded = ckpt.load_checkpoint(root / "step-00000004")
    assert set(loaded["optimizer"]["state"][0]) >= {"exp_avg", "exp_avg_sq", "step"}
    # a half-written directory (crash during save) is never picked up as latest
    (root / "step-00000006.tmp").mkdir()
    assert ckpt.resolve_checkpoint(tmp_path, "latest").name == "step-00000004"
    with pytest.raises(ConfigError, match="not a complete checkpoint"):  # one CLI error line
        ckpt.resolve_checkpoint(tmp_path, str(root / "step-00000006.tmp"))


def test_nan_loss_error_names_rows_and_saves_state(tmp_path):
    r = ToyRecipe(nan_rows={5})
    with pytest.raises(NonFiniteLossError, match=r"rows \[5\]") as e:
        train(r, cfg(tmp_path, max_steps=20, batch_size=4), Accelerator())
    assert "saved to" in str(e.value)
    path = ckpt.resolve_checkpoint(tmp_path, "latest")
    loaded = ckpt.load_checkpoint(path)
    # nothing is lost: the checkpoint holds the last good step, with finite weights equal to the live ones
    assert loaded["state"]["step"] == int(path.name.split("-")[1])
    assert all(torch.isfinite(v).all() for v in loaded["model"].values())
    live = r.trainable_state()
    assert loaded["model"].keys() == live.keys()
    for k in live:
        torch.testing.assert_close(loaded["model"][k], live[k])


def test_nan_loss_skip_counts_and_keeps_weights_finite(tmp_path):
    r = ToyRecipe(nan_rows={5, 17})
    res = train(r, cfg(tmp_path, max_steps=16, batch_size=4, nan_policy="skip"), Accelerator())
    # 64 rows / 4 per batch = 16 batches per epoch: rows 5 and 17 are hit once each in 16 steps
    assert res.skipped_steps == 2
    assert torch.isfinite(weights(r)).all()
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert recs[-1]["train/skipped_steps"] == 2
    assert all(math.isfinite(x["train/loss"]) for x in recs)
    with pytest.raises(NonFiniteLossError, match="max_skipped_steps"):
        train(ToyRecipe(nan_rows={5, 17}), cfg(tmp_path / "b", max_steps=16, batch_size=4, nan_policy="skip",
                                               max_skipped_steps=1), Accelerator())


def test_step0_loss_is_ln2_and_logs(tmp_path):
    r = ToyRecipe()
    res = train(r, cfg(tmp_path, max_steps=1, lr=1e-12), Accelerator())
    assert res.history[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert res.history[0]["train/reward_accuracy"] == pytest.approx(0.5)


class NaNGradRecipe(ToyRecipe):
    """Finite loss, NaN gradient at one step (sqrt at 0: value 0, slope inf, times 0)."""

    def compute(self, batch, step=0, split="train"):
        out = super().compute(batch, step, split)
        if step == 2:
            w = next(self.model.parameters())
            out.loss = out.loss + torch.sqrt(0.0 * w.sum())
        return out


@pytest.mark.parametrize("clip", [None, 1.0])
def test_nan_gradient_with_finite_loss_is_caught(tmp_path, clip):
    """No clipping must not mean no check: a finite loss with a NaN gradient never reaches the weights."""
    with pytest.raises(NonFiniteLossError, match="non-finite gradient at step 3"):
        train(NaNGradRecipe(), cfg(tmp_path / "e", max_steps=5, max_grad_norm=clip), Accelerator())
    r = NaNGradRecipe()
    res = train(r, cfg(tmp_path / "s", max_steps=5, max_grad_norm=clip, nan_policy="skip"), Accelerator())
    assert res.skipped_steps == 1
    assert torch.isfinite(weights(r)).all()


_HEAP_PROBE = """
import os, sys, torch
from mmalign.utils import keep_cpu_heap
print(keep_cpu_heap(), file=sys.stderr)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
x = torch.ones(16 * 2**20)  # 64 MB, above glibc's largest mmap threshold (32 MB)
before = rss()
del x
print((before - rss()) / 2**20)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "confstr") or
                    not __import__("os").confstr("CS_GNU_LIBC_VERSION").startswith("glibc"), reason="glibc only")
@pytest.mark.parametrize("keep", ["1", "0"])
def test_cpu_heap_is_kept_between_steps(keep):
    """keep_cpu_heap (what train() does on CPU): a freed 64 MB block stays in the process for reuse instead of
    being unmapped (and faulted in again, page by page, by the next step's same-sized buffer);
    MMALIGN_KEEP_CPU_HEAP=0 opts out, and then the block goes back to the system."""
    import os
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "MMALIGN_KEEP_CPU_HEAP": keep})
    returned_mb = float(out.stdout.split()[-1])
    assert out.stderr.strip().splitlines()[-1] == ("True" if keep == "1" else "False")
    assert returned_mb < 1 if keep == "1" else returned_mb > 60, returned_mb


def test_train_keeps_the_cpu_heap_on_cpu(tmp_path, monkeypatch):
    import mmalign.train.loop as loop

    calls = []
    monkeypatch.setattr(loop, "keep_cpu_heap", lambda: calls.append(1) or True)
    train(ToyRecipe(), cfg(tmp_path, max_steps=1), Accelerator(cpu=True))
    assert calls == [1]


def test_cpu_adamw_is_fused_and_agrees_with_the_loop(tmp_path, monkeypatch):
    """On CPU AdamW runs torch's fused kernel (torch's own default there is a loop over the tensors, ~31 dispatched
    ops per tensor per step); the weights agree with the loop's to float32 rounding -- the update's terms are summed
    in another order, so not to the bit, and far closer than one step (lr 0.05) moves them."""
    import mmalign.train.loop as loop

    built, real = [], loop.build_optimizer

    def build(params, c, lr, fused, sharded=False):
        opt = real(params, c, lr, sharded)
        if not fused:
            for g in opt.param_groups:
                g["fused"] = None
        built.append(opt)
        return opt

    runs = {}
    for name, fused in [("fused", True), ("loop", False)]:
        monkeypatch.setattr(loop, "build_optimizer",
                            lambda p, c, lr, sharded=False, f=fused: build(p, c, lr, f, sharded))
        recipe = ToyRecipe()
        train(recipe, cfg(tmp_path / name, optimizer="adamw", lr=0.05, max_steps=5, weight_decay=0.01),
              Accelerator(cpu=True))
        runs[name] = weights(recipe)
    assert built[0].param_groups[0]["fused"] is True and built[1].param_groups[0]["fused"] is None
    moved = (runs["loop"] - weights(ToyRecipe())).abs().max()
    assert moved > 0.1  # five steps of ~lr each
    torch.testing.assert_close(runs["fused"], runs["loop"], rtol=1e-6, atol=1e-6)


def test_params_finite_finds_nan_and_inf_and_leaves_the_values_alone():
    """params_finite checks with GradScaler's kernel at scale 1: it must see a NaN or an inf in any trainable
    tensor of any dtype, ignore frozen ones, and leave every value as it was (denormals included)."""
    from mmalign.train.loop import params_finite

    model = torch.nn.ModuleDict({"a": torch.nn.Linear(4, 3), "b": torch.nn.Linear(3, 2).to(torch.bfloat16),
                                 "frozen": torch.nn.Linear(2, 2)})
    model["frozen"].requires_grad_(False)
    with torch.no_grad():
        model["a"].weight[0, 0] = 1e-40  # a float32 denormal
        model["frozen"].weight[0, 0] = float("nan")  # not trained: not checked
    before = [p.detach().clone() for p in model.parameters()]
    assert params_finite(model)
    assert all(torch.equal(a, b) for a, b in zip(before[:4], list(model.parameters())[:4]))
    assert model["a"].weight[0, 0].item() == pytest.approx(1e-40, rel=1e-3)
    for name, bad in [("a", float("nan")), ("b", float("inf")), ("b", float("-inf"))]:
        with torch.no_grad():
            model[name].bias[-1] = bad
        assert not params_finite(model), (name, bad)
        with torch.no_grad():
            model[name].bias[-1] = 0.0
    assert params_finite(model)
