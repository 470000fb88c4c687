"""Loss core: hand-computed values, invariants (ln 2 at init, swap symmetry, beta -> 0), extremes."""
import math

import pytest
import torch

from mmalign.losses import LOSSES, RunningMoments, activation_mask, kto_kl, ld_sequence_scores, mm_dpo_beta, token_kl

LN2 = math.log(2.0)


def sp(x):  # softplus in plain python: -log sigmoid(-x)
    return math.log1p(math.exp(-abs(x))) + max(x, 0.0)


def nls(x):  # -log sigmoid(x)
    return sp(-x)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


T = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731

# one pair: rho_w = 0.5, rho_l = -0.75, delta = 1.25
PC, PR, RC, RR = T(-1.0), T(-2.0), T(-1.5), T(-1.25)
RW, RL, D = 0.5, -0.75, 1.25
B = 0.4

PAIRWISE = sorted(n for n, f in LOSSES.items() if f.kind == "pairwise")


def call_pairwise(name, pc, pr, rc, rr, **kw):
    fn = LOSSES[name]
    if "lengths" in fn.uses:
        kw.setdefault("chosen_lengths", torch.full_like(pc, 4.0))
        kw.setdefault("rejected_lengths", torch.full_like(pc, 4.0))
    if "reward_margin" in fn.uses:  # mm_dpo, copg
        kw.setdefault("reward_margin", torch.zeros_like(pc))
    return fn(pc, pr, rc, rr, **kw)


def test_registry_lists_required_losses():
    required = {"dpo", "ipo", "hinge", "robust", "exo_pair", "nca_pair", "apo_zero", "apo_down", "sppo_hard", "bco",
                "kto", "d2o", "lipo", "pro", "ld_dpo", "dove", "sparse_po", "rpo", "dpo_forward_kl", "dpo_js",
                "dpo_alpha", "mm_dpo"}
    assert required <= set(LOSSES)


def test_unknown_loss_lists_known_names():
    with pytest.raises(KeyError) as e:
        LOSSES["dop"]
    assert "dpo" in str(e.value) and "kto" in str(e.value)


@pytest.mark.parametrize(
    "name,kw,expected",
    [
        ("dpo", {}, nls(B * D)),
        ("dpo", {"label_smoothing": 0.1}, 0.9 * nls(B * D) + 0.1 * nls(-B * D)),
        ("dpo", {"reference_free": True}, nls(B * 1.0)),
        ("dove", {}, nls(B * D)),
        ("hinge", {}, max(0.0, 1 - B * D)),
        ("ipo", {"chosen_lengths": T(1.0), "rejected_lengths": T(1.0)}, (D - 1 / (2 * B)) ** 2),
        ("ipo", {"chosen_lengths": T(2.0), "rejected_lengths": T(5.0)}, (RW / 2 - RL / 5 - 1 / (2 * B)) ** 2),
        ("robust", {"label_smoothing": 0.2}, (0.8 * nls(B * D) - 0.2 * nls(-B * D)) / 0.6),
        ("exo_pair", {"label_smoothing": 1e-3},
         sig(B * D) * (-nls(B * D) - math.log(1 - 1e-3)) + sig(-B * D) * (-nls(-B * D) - math.log(1e-3))),
        ("nca_pair", {}, nls(B * RW) + 0.5 * nls(-B * RW) + 0.5 * nls(-B * RL)),
        ("apo_zero", {}, 1 - sig(B * RW) + sig(B * RL)),
        ("apo_down", {}, sig(B * RW) + 1 - sig(B * D)),
        ("sppo_hard", {}, (RW - 0.5 / B) ** 2 + (RL + 0.5 / B) ** 2),
        ("bco", {}, nls(B * RW) + nls(-B * RL)),
        ("bco", {"shift": 0.1}, nls(B * RW - 0.1) + nls(-(B * RL - 0.1))),
        ("discopop", {"tau": 0.05},
         (1 - sig(B * D / 0.05)) * nls(B * D) + sig(B * D / 0.05) * math.exp(-B * D)),
        ("sigmoid_norm", {"chosen_lengths": T(2.0), "rejected_lengths": T(5.0)}, nls(B * (RW / 2 - RL / 5))),
        ("aot", {}, nls(B * D)),  # one pair: sorting is the identity
        ("aot_unpaired", {}, nls(B * D)),
        ("rpo", {"sft_weight": 0.5, "chosen_lengths": T(4.0)}, nls(B * D) + 0.5 * (1.0 / 4.0)),
        ("rpo", {"sft_weight": 1.0, "chosen_lengths": T(1.0)}, nls(B * D) + 1.0),
        ("mm_dpo", {"reward_margin": T(2.0)}, nls(B * (1 + 0.5 * (1 - math.exp(-1.0))) * D)),
        ("simpo", {"beta": 2.0, "gamma": 0.5, "chosen_lengths": T(2.0), "rejected_lengths": T(4.0)},
         nls(2.0 * (-1.0 / 2 + 2.0 / 4) - 0.5)),
        ("dpo_forward_kl", {}, nls(B * ((1 - math.exp(-RW)) - (1 - math.exp(-RL))))),
        ("dpo_js", {}, nls(B * (-nls(RW) + nls(RL)))),
        ("dpo_alpha", {"alpha": 0.3},
         nls(B * ((math.exp(-0.7 * RW) - 1) / -0.7 - (math.exp(-0.7 * RL) - 1) / -0.7))),
    ],
)
def test_pairwise_hand_values(name, kw, expected):
    kw = dict(kw)
    kw.setdefault("beta", B)
    loss, metrics = call_pairwise(name, PC, PR, RC, RR, **kw)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert {"reward_accuracy", "reward_margin"} <= set(metrics)


@pytest.mark.parametrize("name", PAIRWISE)
def test_policy_equals_reference_gives_tie_accuracy(name):
    x = torch.randn(6, dtype=torch.float64)
    loss, m = call_pairwise(name, x, x.flip(0), x, x.flip(0), beta=0.1)
    assert torch.isfinite(loss).all()
    if LOSSES[name].needs_reference:
        assert torch.all(m["reward_accuracy"] == 0.5)
        assert torch.all(m["reward_margin"] == 0)


SIGMOID_FORMS = ["dpo", "dove", "dpo_forward_kl", "dpo_js", "dpo_alpha", "robust", "aot", "aot_unpaired", "rpo",
                 "mm_dpo", "sigmoid_norm", "hypo"]


@pytest.mark.parametrize("name", SIGMOID_FORMS)
def test_ln2_at_init(name):
    x = torch.randn(5, dtype=torch.float64)
    kw = {"sft_weight": 0.0} if name == "rpo" else {}
    loss, _ = call_pairwise(name, x, x - 1, x, x - 1, beta=0.3, **kw)
    torch.testing.assert_close(loss, torch.full_like(loss, LN2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["dpo", "dpo_js", "dpo_forward_kl", "dpo_alpha", "hinge", "ipo", "robust",
                                  "discopop", "sigmoid_norm", "exo_pair", "hypo"])
def test_swap_symmetry(name):
    """Swapping chosen and rejected negates the margin, flips accuracy, and for the logistic form
    loss(x) - loss(-x) = -x."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(8, generator=g, dtype=torch.float64) for _ in range(4))
    l1, m1 = call_pairwise(name, pc, pr, rc, rr, beta=0.7)
    l2, m2 = call_pairwise(name, pr, pc, rr, rc, beta=0.7)
    torch.testing.assert_close(m2["reward_margin"], -m1["reward_margin"])
    torch.testing.assert_close(m2["reward_accuracy"], 1 - m1["reward_accuracy"])
    if name == "dpo":
        torch.testing.assert_close(l1 - l2, -0.7 * ((pc - rc) - (pr - rr)))
    if name == "hinge":
        torch.testing.assert_close(l1 - l2, torch.relu(1 - 0.7 * m1["reward_margin"] / 0.7)
                                   - torch.relu(1 + 0.7 * m1["reward_margin"] / 0.7))


@pytest.mark.parametrize("name,limit", [("dpo", LN2), ("dpo_js", LN2), ("dpo_forward_kl", LN2), ("robust", LN2),
                                        ("hinge", 1.0), ("apo_zero", 1.0), ("apo_down", 1.0),
                                        ("nca_pair", 2 * LN2), ("bco", 2 * LN2),
                                        ("discopop", 0.5 * LN2 + 0.5)])
def test_beta_to_zero_limit(name, limit):
    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (torch.randn(8, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    loss, _ = call_pairwise(name, pc, pr, rc, rr, beta=1e-12)
    torch.testing.assert_close(loss, torch.full_like(loss, limit), rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", PAIRWISE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_margins_are_finite(name, dtype):
    big = 1e4
    vals = torch.tensor([big, -big, 0.0, big, -big, 0.5], dtype=dtype)
    for pc, pr, rc, rr in [(vals, -vals, -vals, vals), (-vals, vals, vals, -vals), (vals, vals, -vals, -vals)]:
        pc = pc.clone().requires_grad_(True)
        pr = pr.clone().requires_grad_(True)
        loss, m = call_pairwise(name, pc, pr, rc, rr, beta=0.1)
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss).all(), (name, loss)
        loss.sum().backward()
        assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all(), name
        for v in m.values():
            assert not torch.isnan(v).any()


def test_fdpo_alpha_to_one_is_reverse_kl():
    g = torch.Generator().manual_seed(2)
    pc, pr, rc, rr = (torch.randn(8, generator=g, dtype=torch.float64) for _ in range(4))
    ref, _ = LOSSES["dpo"](pc, pr, rc, rr, beta=0.5)
    near, _ = LOSSES["dpo_alpha"](pc, pr, rc, rr, beta=0.5, alpha=1 - 1e-7)
    exact, _ = LOSSES["dpo_alpha"](pc, pr, rc, rr, beta=0.5, alpha=1.0)
    torch.testing.assert_close(near, ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(exact, ref)


def test_rpo_without_lengths_uses_summed_nll():
    """Diffusion passes no lengths: the SFT term is -pc = winner MSE."""
    loss, m = LOSSES["rpo"](PC, PR, RC, RR, beta=B, sft_weight=2.0)
    assert loss.item() == pytest.approx(nls(B * D) + 2.0 * 1.0)
    assert m["sft_nll"].item() == pytest.approx(1.0)


def test_mm_dpo_beta_constants():
    b = mm_dpo_beta(0.1, torch.tensor([0.0, 2.0, 1e6, -3.0]), w=0.5, k=0.5)
    torch.testing.assert_close(b, torch.tensor([0.1, 0.131606, 0.15, 0.1]), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="reward_margin"):
        LOSSES["mm_dpo"](PC, PR, RC, RR, beta=0.1)


def test_bad_shapes_and_hparams_raise():
    with pytest.raises(ValueError, match="ref_chosen"):
        LOSSES["dpo"](torch.zeros(3), torch.zeros(3), torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="1-D"):
        LOSSES["dpo"](torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="label_smoothing"):
        LOSSES["exo_pair"](PC, PR, RC, RR, label_smoothing=0.0)
    with pytest.raises(ValueError, match="flip rate"):
        LOSSES["robust"](PC, PR, RC, RR, label_smoothing=0.5)
    with pytest.raises(ValueError, match="lengths"):
        LOSSES["sigmoid_norm"](PC, PR, RC, RR)
    with pytest.raises(ValueError, match="divergence"):
        LOSSES["dpo"](PC, PR, RC, RR, divergence="hellinger")


def test_running_moments_shift():
    """delta is the running mean of every previous optimiser step's rewards; a step stages, then commits."""
    rm = RunningMoments()
    pc, pr, rc, rr = T(1.0, 2.0), T(0.0, -1.0), T(0.0, 0.0), T(0.0, 0.0)
    loss, _ = LOSSES["bco"](pc, pr, rc, rr, beta=1.0, running=rm)
    exp0 = torch.tensor([nls(1.0) + nls(0.0), nls(2.0) + nls(1.0)], dtype=torch.float64)  # delta = 0 at step 1
    torch.testing.assert_close(loss, exp0)
    assert rm.mean == 0.0  # nothing committed yet
    rm.commit()
    mean = (1 + 2 + 0 - 1) / 4  # rewards [1, 2, 0, -1]
    assert rm.mean == pytest.approx(mean)
    loss, _ = LOSSES["bco"](pc, pr, rc, rr, beta=1.0, running=rm)
    exp = torch.tensor([nls(1 - mean) + nls(-(0 - mean)), nls(2 - mean) + nls(-(-1 - mean))], dtype=torch.float64)
    torch.testing.assert_close(loss, exp)
    rm.commit()  # the second step's rewards, then a third with (3, 3) updates by the Chan formula
    LOSSES["bco"](T(3.0), T(3.0), T(0.0), T(0.0), beta=1.0, running=rm)
    rm.commit()
    assert rm.mean == pytest.approx((2 * (1 + 2 + 0 - 1) + 3 + 3) / 10)
    rm2 = RunningMoments()
    rm2.load_state_dict(rm.state_dict())
    assert rm2.state_dict() == rm.state_dict()


def test_aot_returns_per_example_losses_in_row_order():
    """Row i's loss is computed from row i's policy margin (and the reference margin of the same rank),
    so a non-finite report names the right rows."""
    pc, pr = T(3.0, -1.0, 0.5), T(0.0, 0.0, 0.0)  # policy margins 3, -1, 0.5: ranks 2, 0, 1
    rc, rr = T(0.2, 0.1, 0.3), T(0.0, 0.0, 0.0)  # reference margins sorted: 0.1, 0.2, 0.3
    loss, _ = LOSSES["aot"](pc, pr, rc, rr, beta=1.0)
    exp = T(nls(3.0 - 0.3), nls(-1.0 - 0.1), nls(0.5 - 0.2))
    torch.testing.assert_close(loss, exp)
    lu, _ = LOSSES["aot_unpaired"](pc, T(1.0, 2.0, 0.0), rc, T(0.0, 0.0, 0.0), beta=1.0)
    # rho_w = 2.8, -1.1, 0.2 (ranks 2, 0, 1); rho_l = 1, 2, 0, sorted 0, 1, 2
    torch.testing.assert_close(lu, T(nls(2.8 - 2.0), nls(-1.1 - 0.0), nls(0.2 - 1.0)))


# ---------------------------------------------------------------- unpaired


def test_kto_hand_values_and_apo_reduction():
    pol, ref, lab = T(-1.0, -2.0), T(-1.5, -1.0), torch.tensor([1, 0])
    loss, m = LOSSES["kto"](pol, ref, lab, beta=0.5, kl=0.2, desirable_weight=1.5, undesirable_weight=0.8)
    exp = [1.5 * (1 - sig(0.5 * (0.5 - 0.2))), 0.8 * (1 - sig(0.5 * (0.2 + 1.0)))]
    torch.testing.assert_close(loss, T(*exp))
    torch.testing.assert_close(m["reward_accuracy"], T(1.0, 1.0))
    l0, _ = LOSSES["kto"](pol, ref, lab, beta=0.5, kl=0.0)
    la, _ = LOSSES["apo_zero_unpaired"](pol, ref, lab, beta=0.5)
    torch.testing.assert_close(l0, la)  # KTO with z0 = 0 is APO-zero's sigmoid pair


def test_kto_kl_clamped_and_tie_labels_rejected():
    assert kto_kl(T(-3.0, -3.0), T(-1.0, -1.0)).item() == 0.0
    assert kto_kl(T(-1.0, -2.0), T(-2.0, -2.0)).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="row 1"):
        LOSSES["kto"](T(0.0, 0.0), T(0.0, 0.0), torch.tensor([1.0, 0.5]))


def test_bco_unpaired_matches_pairwise_on_balanced_batch():
    pc, pr, rc, rr = T(0.3), T(-0.2), T(0.1), T(0.4)
    lp, _ = LOSSES["bco"](pc, pr, rc, rr, beta=0.5, shift=0.05)
    lu, _ = LOSSES["bco_unpaired"](torch.cat([pc, pr]), torch.cat([rc, rr]), torch.tensor([1, 0]), beta=0.5, shift=0.05)
    torch.testing.assert_close(lp, lu.sum().reshape(1))


def test_d2o_k1_is_dpo_and_hand_value():
    g = torch.Generator().manual_seed(3)
    ps, rs = torch.randn(4, 1, generator=g, dtype=torch.float64), torch.randn(4, 1, generator=g, dtype=torch.float64)
    pl, rl = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    l_d2o, _ = LOSSES["d2o"](ps, rs, pl, rl, beta=0.3, alpha=0.3)
    l_dpo, _ = LOSSES["dpo"](ps[:, 0], pl, rs[:, 0], rl, beta=0.3)
    torch.testing.assert_close(l_d2o, l_dpo)
    ps2, rs2 = T(1.0, 3.0).reshape(1, 2), T(0.0, 0.0).reshape(1, 2)
    loss, _ = LOSSES["d2o"](ps2, rs2, T(-1.0), T(0.0), beta=0.2, alpha=0.1,
                            sample_mask=torch.tensor([[True, False]]))
    assert loss.item() == pytest.approx(nls(0.2 * 1.0 + 0.1 * 1.0))


# ---------------------------------------------------------------- listwise


def test_lipo_k2_is_weighted_dpo():
    pol, ref, lab = T(-1.0, -2.0).reshape(1, 2), T(-1.5, -1.25).reshape(1, 2), T(1.0, 0.0).reshape(1, 2)
    loss, m = LOSSES["lipo"](pol, ref, lab, beta=B)
    w = (2**1 - 1) * abs(1 / math.log2(2) - 1 / math.log2(3))
    assert loss.item() == pytest.approx(w * nls(B * D))
    assert m["reward_accuracy"].item() == 1.0


def test_lipo_three_item_hand_value_and_mask():
    s = [0.2, 0.9, -0.4]  # beta * rho after beta=1, ref=0
    psi = [1.0, 0.5, 0.0]
    tau = {1: 1, 0: 2, 2: 3}  # ranks by current s (descending)
    G = [2**p - 1 for p in psi]
    invd = [1 / math.log2(1 + tau[i]) for i in range(3)]
    exp = 0.0
    for i in range(3):
        for j in range(3):
            if psi[i] > psi[j]:
                exp += abs(G[i] - G[j]) * abs(invd[i] - invd[j]) * sp(-(s[i] - s[j]))
    loss, _ = LOSSES["lipo"](T(*s).reshape(1, 3), None, T(*psi).reshape(1, 3), beta=1.0)
    assert loss.item() == pytest.approx(exp)
    # a padded 4th slot changes nothing
    loss4, _ = LOSSES["lipo"](T(*s, 7.0).reshape(1, 4), None, T(*psi, 5.0).reshape(1, 4), beta=1.0,
                              mask=torch.tensor([[True, True, True, False]]))
    assert loss4.item() == pytest.approx(exp)
    with pytest.raises(ValueError, match="labels"):
        LOSSES["lipo"](T(*s).reshape(1, 3), None, T(1.0, 0.0).reshape(1, 2))


def test_pro_hand_values():
    loss, _ = LOSSES["pro"](T(0.3, -0.1).reshape(1, 2), None, T(2.0, 1.0).reshape(1, 2))
    assert loss.item() == pytest.approx(sp(-0.1 - 0.3))  # T = 1: log(e^{s1}+e^{s2}) - s1
    s, r = [0.5, -0.2, 0.1], [3.0, 1.0, 2.0]  # sorted by reward: idx 0 (3), 2 (2), 1 (1)
    ss, rr_ = [0.5, 0.1, -0.2], [3.0, 2.0, 1.0]
    exp = 0.0
    for k in range(2):
        tk = [rr_[k] - rr_[j] for j in range(k + 1, 3)]
        terms = [ss[k] * max(tk)] + [ss[j] * (rr_[k] - rr_[j]) for j in range(k + 1, 3)]
        exp += math.log(sum(math.exp(t) for t in terms)) - ss[k] * max(tk)
    loss, m = LOSSES["pro"](T(*s).reshape(1, 3), None, T(*r).reshape(1, 3))
    assert loss.item() == pytest.approx(exp)
    big, _ = LOSSES["pro"](T(1e4, -1e4, 0.0).reshape(1, 3), None, T(3.0, 1.0, 2.0).reshape(1, 3))
    assert torch.isfinite(big).all()


# ---------------------------------------------------------------- token-level


def _tok(seed, b=3, t=6):
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(b, t, generator=g, dtype=torch.float64) * 3


def test_ld_dpo_alpha_one_is_dpo_and_hand_value():
    cm = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    rm = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]])
    pct, prt, rct, rrt = _tok(1), _tok(2), _tok(3), _tok(4)
    l1, _ = LOSSES["ld_dpo"](pct, prt, rct, rrt, cm, rm, beta=0.2, alpha=1.0)
    ld, _ = LOSSES["dpo"]((pct * cm).sum(-1), (prt * rm).sum(-1), (rct * cm).sum(-1), (rrt * rm).sum(-1), beta=0.2)
    torch.testing.assert_close(l1, ld)
    # row 0: chosen 3 tokens, rejected 5 -> shared 3; rejected tail = its last 2 completion tokens
    c, r = ld_sequence_scores(pct, prt, cm, rm, alpha=0.25)
    assert c[0].item() == pytest.approx(pct[0, 1:4].sum().item())
    assert r[0].item() == pytest.approx(prt[0, 1:4].sum().item() + 0.25 * prt[0, 4:6].sum().item())


def test_sparse_po_defaults_to_dpo_and_kl_term():
    cm = torch.tensor([[0, 1, 1, 1, 0, 0]] * 3)
    rm = torch.tensor([[0, 1, 1, 1, 1, 0]] * 3)
    pct, prt, rct, rrt = _tok(5), _tok(6), _tok(7), _tok(8)
    ls, _ = LOSSES["sparse_po"](pct, prt, rct, rrt, cm, rm, beta=0.3)
    ld, _ = LOSSES["dpo"]((pct * cm).sum(-1), (prt * rm).sum(-1), (rct * cm).sum(-1), (rrt * rm).sum(-1), beta=0.3)
    torch.testing.assert_close(ls, ld)
    kc, kr = torch.full((3, 6), -0.1, dtype=torch.float64), torch.full((3, 6), -0.2, dtype=torch.float64)
    wc = torch.full((3, 6), 0.5, dtype=torch.float64)
    lk, _ = LOSSES["sparse_po"](pct, prt, rct, rrt, cm, rm, beta=0.3, chosen_weights=wc, chosen_kl=kc, rejected_kl=kr)
    u = 0.5 * ((pct - rct) * cm).sum(-1) - ((prt - rrt) * rm).sum(-1)
    d = 0.5 * (-0.1 * 3) - (-0.2 * 4)
    torch.testing.assert_close(lk, -torch.nn.functional.logsigmoid(0.3 * (u - d)))


def test_activation_mask_and_token_kl():
    h = torch.randn(2, 5, 7)
    m = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    for mode in ("sigmoid", "zn_rescale"):
        w = activation_mask(h, m, mode)
        assert w.shape == (2, 5) and (w >= 0).all() and (w <= 1).all()
        assert (w[m == 0] == 0).all()
    z = activation_mask(h, m, "zn_rescale")
    assert z[1].max().item() == pytest.approx(1.0) and z[1].min().item() == pytest.approx(0.0)
    logits = torch.randn(2, 5, 11)
    assert torch.allclose(token_kl(logits, logits), torch.zeros(2, 5), atol=1e-6)
    assert (token_kl(logits, torch.randn(2, 5, 11)) <= 1e-6).all()  # -KL <= 0


def test_reinforce_hand_value_and_gradient():
    lp = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]], requires_grad=True)
    adv = torch.tensor([[0.5, -0.5], [1.0, 0.0]])
    loss, m = LOSSES["reinforce"](lp, adv)
    torch.testing.assert_close(loss, torch.tensor([-(0.5 * -1 - 0.5 * -2) / 2, -(1.0 * -0.5) / 2]))
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, -adv / 2)  # gradient ascent on A * log p
    torch.testing.assert_close(m["positive_fraction"], torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="differ"):
        LOSSES["reinforce"](lp, adv[:, :1])
