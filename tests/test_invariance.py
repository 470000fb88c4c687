"""Batch invariance for every registered loss: batch 8 x accumulation 1 == batch 1 x accumulation 8.

Scores come from a tiny linear "model" (features @ theta), so the gradient each split applies can be
compared exactly. Each step follows the recipes' protocol: step-level state is formed from all
micro-batches first (KTO's KL point), every micro-batch backwards ``backward_loss`` (the shared
reduction), and stateful losses commit once per optimiser step (BCO's running mean). Losses that sort
within their batch (``batch_dependent``) cannot be invariant; for them the config layer must refuse
accumulation -- and the test shows that refusal is needed. A new loss is covered automatically.
"""
from __future__ import annotations

import math

import pytest
import torch

from mmalign.config import ConfigError
from mmalign.losses import LOSSES, RunningMoments, backward_loss, kto_kl
from mmalign.train.sections import LossSection, TrainSection, check_loss_and_batching

D, K, T, N = 5, 3, 6, 8  # features, list/group size, tokens, rows per optimiser step
HP = {"mm_dpo": {"beta": 0.5}, "simpo": {"beta": 2.0}}


def rows(seed: int, n: int = N) -> list[dict]:
    """Features for every input any loss kind can take; each kind reads what it needs."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    out = []
    for i in range(n):
        out.append({
            "xc": r(D), "xr": r(D), "rc": r(()), "rr": r(()), "lc": float(3 + i % 4), "lr": float(2 + i % 3),
            "margin": r(()).abs(), "label": i % 2, "xm": r(D), "rm": r(()),
            "xl": r(K, D), "rl": r(K), "scores": r(K), "lmask": torch.tensor([True] * (K - (i % 2)) + [False] * (i % 2)),
            "xt_c": r(T, D), "xt_r": r(T, D), "rt_c": r(T), "rt_r": r(T),
            "tm_c": (torch.arange(T) < 3 + i % 3).double(), "tm_r": (torch.arange(T) < 2 + i % 4).double(),
            "adv": r(K), "ll": torch.tensor([3.0 + (i + j) % 4 for j in range(K)], dtype=torch.float64),
        })
    return out


def micro_loss(fn, theta: torch.Tensor, rs: list[dict], running, step_kl):
    st = lambda k: torch.stack([x[k] for x in rs])  # noqa: E731
    hp, kind, uses = dict(HP.get(fn.registry_name, {})), fn.kind, fn.uses
    if "running" in uses:
        hp["running"] = running
    if kind == "pairwise":
        pc, pr = st("xc") @ theta, st("xr") @ theta
        rc, rr = (st("rc"), st("rr")) if fn.needs_reference else (None, None)
        if "lengths" in uses:
            hp["chosen_lengths"] = torch.tensor([x["lc"] for x in rs], dtype=torch.float64)
            hp["rejected_lengths"] = torch.tensor([x["lr"] for x in rs], dtype=torch.float64)
        if "reward_margin" in uses:
            hp["reward_margin"] = st("margin")
        if "online_samples" in uses:
            hp.update(sample_logps=st("xl") @ theta, sample_ref_logps=st("rl"), sample_mask=st("lmask"))
        return fn(pc, pr, rc, rr, **hp)[0]
    if kind == "unpaired":
        if "kl" in uses:
            hp["kl"] = step_kl
        return fn(st("xc") @ theta, st("rc"), torch.tensor([x["label"] for x in rs]), **hp)[0]
    if kind == "listwise":
        ref = st("rl") if fn.needs_reference else None
        if "list_lengths" in uses:
            hp["lengths"] = st("ll")
        return fn(st("xl") @ theta, ref, st("scores"), mask=st("lmask"), **hp)[0]
    if kind == "group":  # K on-policy samples per prompt; binary rewards (DisCO) are the scores' signs
        if "list_lengths" in uses:
            hp["lengths"] = st("ll")
        rewards = (st("scores") > 0).double() if "group_kl" in uses else st("scores")
        return fn(st("xl") @ theta, st("rl") if fn.needs_reference else None, rewards, mask=st("lmask"), **hp)[0]
    if kind == "token":
        return fn(st("xt_c") @ theta, st("xt_r") @ theta, st("rt_c"), st("rt_r"), st("tm_c"), st("tm_r"), **hp)[0]
    if kind == "negatives":
        return fn(st("xl") @ theta, st("rl"), st("xr") @ theta, st("rr"), sample_mask=st("lmask"), **hp)[0]
    if kind == "policy_gradient":
        return fn(st("xl") @ theta, st("adv"), mask=st("lmask"), **hp)[0]
    if kind in ("policy_ratio", "flow_ratio"):  # GRPO / AWM: per-sample log-probs against the rollout's, group advantages
        lp = st("xc") @ theta
        return fn(lp, st("rc"), st("rm"), kl=(st("xr") @ theta) ** 2, **hp)[0]
    if kind == "flow_mix":  # DiffusionNFT: per-sample predictions [B, T] with a linear x0 map
        x_t = st("rt_c")
        return fn(st("xt_c") @ theta, st("xt_r") @ theta.detach(), st("rt_r"), lambda v: x_t - 0.3 * v, st("rm"),
                  ref_pred=st("rt_r") * 0.5, **hp)[0]
    raise AssertionError(f"no invariance harness for loss kind {kind!r} ({fn.registry_name}): add one")


def train_steps(name: str, batch: int, accum: int, steps: int = 2, reverse: bool = False) -> torch.Tensor:
    """``steps`` SGD steps of N rows each, split into ``accum`` micro-batches of ``batch``; returns theta."""
    assert batch * accum == N
    fn = LOSSES[name]
    theta = torch.linspace(-0.3, 0.4, D, dtype=torch.float64).requires_grad_(True)
    running = RunningMoments() if "running" in fn.uses else None
    for s in range(steps):
        data = rows(100 + s)
        micro = [data[i * batch: (i + 1) * batch] for i in range(accum)]
        if reverse:
            micro = micro[::-1]
        step_kl = None
        if "kl" in fn.uses:  # from mismatched pairs of the whole step, as LMRecipe.begin_step does
            with torch.no_grad():
                step_kl = kto_kl(torch.stack([x["xm"] for x in data]) @ theta, torch.stack([x["rm"] for x in data]))
        for mb in micro:
            backward_loss(micro_loss(fn, theta, mb, running, step_kl), float(N)).backward()
        with torch.no_grad():
            theta -= 0.5 * theta.grad
        theta.grad = None
        if running is not None:
            running.commit()
    return theta.detach()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_batch8_accum1_equals_batch1_accum8_for_every_loss(name):
    fn = LOSSES[name]
    one = train_steps(name, N, 1)
    assert torch.isfinite(one).all()
    assert not torch.allclose(one, torch.linspace(-0.3, 0.4, D, dtype=torch.float64)), "the loss did not move theta"
    if fn.batch_dependent:
        # cannot hold (the sort sees different rows), so the config layer refuses accumulation for it
        assert not torch.allclose(train_steps(name, 1, N), one, rtol=1e-6, atol=1e-9)
        with pytest.raises(ConfigError, match="batch-dependent"):
            check_loss_and_batching(LossSection(name=name), TrainSection(batch_size=1, grad_accum=8))
        check_loss_and_batching(LossSection(name=name), TrainSection(batch_size=8, grad_accum=1))
        return
    for b, a, rev in ((1, 8, False), (2, 4, False), (4, 2, True), (1, 8, True)):
        torch.testing.assert_close(train_steps(name, b, a, reverse=rev), one, rtol=1e-10, atol=1e-12,
                                   msg=lambda m: f"{name}: batch {b} x accum {a}{' reversed' if rev else ''}: {m}")


def test_running_moments_commit_equals_one_update_of_all_rewards():
    x = torch.randn(12, dtype=torch.float64)
    a, b = RunningMoments(), RunningMoments()
    a.update(torch.randn(5))
    b.load_state_dict(a.state_dict())
    a.update(x)
    before = b.mean
    for chunk in x.split(5):
        b.stage(chunk)
    b.stage(torch.tensor([math.nan]))  # non-finite rewards are ignored
    assert b.mean == before  # staging does not move the state before the step's commit
    b.commit()
    assert b.mean == pytest.approx(a.mean, rel=1e-12) and b.var == pytest.approx(a.var, rel=1e-9)
    b.stage(torch.ones(3))
    b.discard()
    assert b.commit() == pytest.approx(a.mean, rel=1e-12)  # a skipped step stages nothing
