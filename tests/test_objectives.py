"""The seed objectives added to the core: IRPO, CoPG, DisCO / DisCO-b, f-DPG, HyPO, the reward transform --
hand values, limits, and (IRPO, DisCO) the authors' formulas on the same tensors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmalign.losses import LOSSES
from mmalign.rewards.transform import reference_rewards, transformed_reward

D = torch.float64


def t(*v):
    return torch.tensor(v, dtype=D)


# ---------------------------------------------------------------- IRPO

def authors_irpo(r, rel, rank, beta):
    """The formula of rdpo_loss in rohan2810/In-context-Ranking-Preference-Optimization (trainers.py), one list:
    the diagonal gets -100 *before* beta, then logsumexp - log(N - 1), weights (2^rel - 1)/log2(1 + rank)."""
    w = (2 ** rel - 1) / torch.log2(1 + rank)
    diffs = (r.unsqueeze(0) - r.unsqueeze(1)) - torch.eye(r.shape[0], dtype=r.dtype) * 100
    lse = torch.logsumexp(beta * diffs, dim=1) - np.log(diffs.shape[0] - 1)
    return -(w * F.logsigmoid(-lse)).mean()


def test_irpo_matches_the_authors_formula_and_fixes_the_diagonal_leak():
    g = torch.Generator().manual_seed(0)
    pol, ref = torch.randn(3, 5, generator=g, dtype=D), torch.randn(3, 5, generator=g, dtype=D)
    rel = torch.tensor([[3, 2, 1, 0, 2], [1, 0, 0, 2, 3], [4, 3, 2, 1, 0]], dtype=D)
    rank = 1 + (rel.unsqueeze(1) > rel.unsqueeze(2)).sum(-1).to(D)
    for beta in (1.0, 2.0):  # exp(-100 beta) is negligible: same numbers
        ours, _ = LOSSES["irpo"](pol, ref, rel, beta=beta)
        theirs = torch.stack([authors_irpo(pol[i] - ref[i], rel[i], rank[i], beta) for i in range(3)])
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    ours, _ = LOSSES["irpo"](pol, ref, rel, beta=0.01)  # where the -100 leaks, the -inf mask does not
    theirs = torch.stack([authors_irpo(pol[i] - ref[i], rel[i], rank[i], 0.01) for i in range(3)])
    assert (ours - theirs).abs().max() > 1e-3


def test_irpo_limits_and_permutation():
    rel = t(3, 1, 0, 2).view(1, 4)
    w = (2 ** rel - 1) / torch.log2(1 + t(1, 3, 4, 2).view(1, 4))
    same = torch.randn(1, 4, dtype=D)
    loss, m = LOSSES["irpo"](same, same, rel, beta=0.5)
    torch.testing.assert_close(loss, (math.log(2) * w).mean(-1))  # pi = pi_ref: ln 2 per item
    perm = [2, 0, 3, 1]
    pol, ref = torch.randn(1, 4, dtype=D), torch.randn(1, 4, dtype=D)
    a, _ = LOSSES["irpo"](pol, ref, rel, beta=0.7)
    b, _ = LOSSES["irpo"](pol[:, perm], ref[:, perm], rel[:, perm], beta=0.7)
    torch.testing.assert_close(a, b)  # a list is a set: order does not matter
    # at pi = pi_ref, dL/dr_i = 0.5 (mean_{j != i} w_j - w_i) / N: raising the most relevant item
    # (largest gain) lowers the loss and raising the least relevant (gain 0) raises it. Away from pi_ref the
    # sign can flip (raising item i also raises every other item's log-sum-exp), so the check sits at pi_ref.
    for i, sign in ((0, -1), (2, 1)):
        up = same.clone()
        up[0, i] += 1e-3
        delta = LOSSES["irpo"](up, same, rel, beta=0.7)[0] - loss
        expect = 0.5 * 0.7e-3 * (torch.cat([w[0, :i], w[0, i + 1:]]).mean() - w[0, i]) / 4
        assert torch.sign(delta) == sign
        torch.testing.assert_close(delta, expect.view(1), rtol=1e-2, atol=0)
    lengths = t(2, 4, 4, 8).view(1, 4)
    c, _ = LOSSES["irpo"](pol, ref, rel, beta=0.7, lengths=lengths)
    d, _ = LOSSES["irpo"](pol / lengths, ref / lengths, rel, beta=0.7)
    torch.testing.assert_close(c, d)  # token means, as the authors score


# ---------------------------------------------------------------- CoPG

def test_copg_hand_value_and_reduces_to_ipo():
    pc, pr, rc, rr = t(-1.0, -2.0), t(-1.5, -1.0), t(-1.2, -1.8), t(-1.1, -0.9)
    beta = 0.3
    loss, _ = LOSSES["copg"](pc, pr, rc, rr, beta=beta, reward_margin=t(0.8, -0.4))
    rho = (pc - rc) - (pr - rr)
    torch.testing.assert_close(loss, (t(0.8, -0.4) - beta * rho) ** 2 / (2 * beta))
    # with R(y) - R(y') = 1/2 the gradient is beta/2 x the gradient of (unnormalised) IPO
    a = pc.clone().requires_grad_(True)
    LOSSES["copg"](a, pr, rc, rr, beta=beta, reward_margin=t(0.5, 0.5))[0].sum().backward()
    b = pc.clone().requires_grad_(True)
    LOSSES["ipo"](b, pr, rc, rr, beta=beta)[0].sum().backward()
    torch.testing.assert_close(a.grad, beta / 2 * b.grad)
    with pytest.raises(ValueError, match="reward_margin"):
        LOSSES["copg"](pc, pr, rc, rr)


# ---------------------------------------------------------------- DisCO

def authors_disco_surrogate(scores, rewards, tau, num_questions):
    """compute_policy_loss_disco_logL of Optimization-AI/DisCO (verl core_algos.py) after its token mean, on
    grouped scores; returns the surrogate -pg_loss whose *gradient* is the objective's (no constraint)."""
    pos, neg = rewards == 1, rewards == 0
    valid = (pos.sum(1) != 0) & (neg.sum(1) != 0)
    s, pos, neg = scores[valid], pos[valid], neg[valid]
    masked = (s / tau).masked_fill(~neg, float("-inf"))
    mx = masked.max(-1, keepdim=True).values
    ex = torch.exp(((s / tau) - mx.detach()) * neg) * neg
    se = ex.sum(-1, keepdim=True)
    lme = se / (se.detach() + torch.finfo(se.dtype).eps)
    pg = ((s - tau * lme) * pos).sum(1, keepdim=True) / pos.sum(1, keepdim=True)
    return -(pg.sum() / num_questions)


def test_disco_gradient_matches_the_authors_and_value_is_the_objective():
    g = torch.Generator().manual_seed(1)
    s0 = torch.randn(4, 6, generator=g, dtype=D) * 0.5
    rewards = t(1, 0, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0).view(4, 6)  # groups 2 and 4: no signal
    a = s0.clone().requires_grad_(True)
    loss, m = LOSSES["disco"](a, None, rewards, tau=10.0)
    loss.sum().div(4).backward()  # the shared reduction: sum over groups / number of groups
    b = s0.clone().requires_grad_(True)
    authors_disco_surrogate(b, rewards, 10.0, 4).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)  # gradients equal; values differ by design
    assert loss[1] == 0 and loss[3] == 0 and m["valid_group"].tolist() == [1, 0, 1, 0]
    assert a.grad[1].abs().sum() == 0 and a.grad[3].abs().sum() == 0  # dropped groups teach nothing
    pos, neg = s0[0][rewards[0] == 1], s0[0][rewards[0] == 0]
    j = pos.mean() - 10.0 * (torch.logsumexp(neg / 10.0, 0) - math.log(len(neg)))
    torch.testing.assert_close(loss[0], -j)  # the value is -J itself


def test_disco_b_and_the_constraint():
    s = t(0.2, -0.1, 0.5, -0.3).view(1, 4)
    r = t(1, 0, 1, 0).view(1, 4)
    loss, m = LOSSES["disco_b"](s, None, r)
    torch.testing.assert_close(loss, -(t(0.35) - t(-0.2)))
    assert m["reward_accuracy"].item() == 1.0
    kl = torch.tensor(0.01, dtype=D, requires_grad=True)  # above delta: the hinge pushes KL down
    with_kl, _ = LOSSES["disco_b"](s, None, r, kl=kl, beta=100.0, delta=1e-4)
    torch.testing.assert_close(with_kl - loss, t(100 * (0.01 - 1e-4) * 0.01).view(1))
    with_kl.sum().backward()
    assert kl.grad.item() == pytest.approx(100 * (0.01 - 1e-4))
    with pytest.raises(ValueError, match="binary rewards"):
        LOSSES["disco"](s, None, t(0.3, 0, 1, 0).view(1, 4))


# ---------------------------------------------------------------- f-DPG

def test_f_dpg_stops_at_the_target_and_pushes_towards_reward():
    ref = torch.log(t(0.5, 0.3, 0.2)).view(1, 3)
    rewards = t(0.0, 1.0, 2.0).view(1, 3)
    beta = 0.5
    target = torch.log_softmax(ref + rewards / beta, -1)  # p = pi_ref exp(r / beta) / Z
    for div in ("forward_kl", "reverse_kl", "js", "alpha"):
        at = target.clone().requires_grad_(True)
        loss, m = LOSSES["f_dpg"](at, ref, rewards, beta=beta, divergence=div)
        loss.sum().backward()
        torch.testing.assert_close(at.grad, torch.zeros_like(at), atol=1e-9, rtol=0)  # pi = p: nothing to learn
        torch.testing.assert_close(m["kl_to_target"], t(0.0), atol=1e-9, rtol=0)
        pi = ref.clone().requires_grad_(True)  # start at the reference: probability moves towards reward
        LOSSES["f_dpg"](pi, ref, rewards, beta=beta, divergence=div)[0].sum().backward()
        assert pi.grad[0, 2] < 0 < pi.grad[0, 0], (div, pi.grad)  # descent raises log pi of the best sample


# ---------------------------------------------------------------- HyPO

def test_hypo_is_dpo_plus_a_reinforce_kl_term():
    pc, pr, rc, rr = t(-1.0, -2.0), t(-1.5, -1.0), t(-1.2, -1.8), t(-1.1, -0.9)
    dpo, _ = LOSSES["dpo"](pc, pr, rc, rr, beta=0.1)
    plain, _ = LOSSES["hypo"](pc, pr, rc, rr, beta=0.1)
    torch.testing.assert_close(plain, dpo)
    s = torch.tensor([[-3.0, -2.0, -4.0], [-1.0, -1.5, -2.5]], dtype=D, requires_grad=True)
    r = torch.tensor([[-3.5, -2.0, -3.0], [-1.2, -1.0, -2.0]], dtype=D)
    loss, m = LOSSES["hypo"](pc, pr, rc, rr, beta=0.1, kl_weight=0.5, sample_logps=s, sample_ref_logps=r)
    rho = (s - r).detach()
    torch.testing.assert_close(m["kl"], rho.mean(-1))
    loss.sum().backward()
    torch.testing.assert_close(s.grad, 0.5 * (rho - rho.mean(-1, keepdim=True)) / 3)  # E[(rho - b) grad log pi]


# ---------------------------------------------------------------- reward transform

def test_reward_transform_hand_values_and_and_behaviour():
    r = t(2.0, -1.0).view(1, 2)
    ref = t(1.0, 0.0)
    torch.testing.assert_close(transformed_reward(r, ref), F.logsigmoid(t(1.0)) + F.logsigmoid(t(-1.0)))
    # AND: one reward far below its reference costs more than the other far above it earns
    both_ok = transformed_reward(t(1.5, 0.5).view(1, 2), ref)
    one_bad = transformed_reward(t(5.0, -3.0).view(1, 2), ref)
    assert both_ok > one_bad
    assert transformed_reward(t(100.0).view(1, 1), t(0.0)) > -1e-6  # saturates at 0
    torch.testing.assert_close(reference_rewards(torch.arange(12.0).view(2, 3, 2)), torch.tensor([[2.0, 3.0], [8.0, 9.0]]))


# ---------------------------------------------------------------- the online text path

@pytest.mark.parametrize("config", ["lm_online_dpo", "lm_disco"])
def test_online_rounds_move_the_reward_on_held_out_prompts(tmp_path, config):
    """On-policy rounds on the toy text world (the shipped policy prefers unpleasant words): the known reward
    of samples on prompts about unseen topics rises."""
    from mmalign.train.lm import run
    from mmalign.train.sections import load_config

    res = run(load_config(f"configs/tiny/{config}.yaml", [f"train.output_dir={tmp_path}", "train.progress=false"]))
    rewards = [e["eval/reward"] for e in res.eval_history]
    assert len(rewards) >= 2 and rewards[-1] > rewards[0] + 0.2, rewards
    assert [r["round"] for r in res.online] == list(range(len(res.online))) and res.online[0]["rows"] >= 8
    assert (tmp_path / "online" / "round-00000" / "rows.parquet").exists() and (tmp_path / "final" / "config.json").exists()


def test_hypo_trains_offline_pairs_with_online_kl(tmp_path):
    from mmalign.train.lm import run
    from mmalign.train.sections import load_config

    res = run(load_config("configs/tiny/lm_dpo.yaml", [
        f"train.output_dir={tmp_path}", "train.progress=false", "model.tiny=null",
        "model.name_or_path=assets/models/toy-lm", "loss={name: hypo, beta: 0.1, kl_weight: 0.5}",
        "online={samples: 2, max_new_tokens: 8, reward: 'py:mmalign.toyworld.text:pleasantness'}",
        "train.max_steps=4", "train.eval_every=0", "train.log_every=1", "train.batch_size=4"]))
    kls = [h["train/kl"] for h in res.history]
    assert len(kls) == 4 and all(math.isfinite(k) for k in kls) and abs(kls[0]) < 1e-4  # pi = pi_ref at step 1
    assert kls[-1] != kls[0]


def test_transformed_sum_of_rewards_is_reachable_from_the_config(tmp_path):
    """online.reward "f + g" with reward_transform: rounds train on sum_m log sigmoid(r_m - r_ref,m) (<= 0),
    while evaluation reports the plain sum of the rewards."""
    from mmalign.train.lm import run
    from mmalign.train.sections import load_config

    res = run(load_config("configs/tiny/lm_online_dpo.yaml", [
        f"train.output_dir={tmp_path}", "train.progress=false", "online.rounds=1", "online.steps_per_round=2",
        "online.max_prompts=32", "online.reward_transform=true",
        "online.reward='py:mmalign.toyworld.text:pleasantness + py:mmalign.toyworld.text:pleasant'"]))
    assert res.online[0]["mean_reward"] <= 0.0
    assert -2.0 <= res.eval_history[0]["eval/reward"] <= 3.0
