"""Our loss core vs TRL (pinned in the [test] extra) on identical batches, fp32, within 1e-5.

TRL builds and collates the batch and computes its loss with ``_compute_loss``; we score the same
tensors with ``mmalign.models.lm.completion_logps`` and apply our loss. This checks the whole text
path -- completion masking, fp32 log-softmax, summation, the loss formula -- not just the formula.
"""
import json
import warnings

import pytest
import torch

trl = pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from mmalign.data.text import TextPreferenceData  # noqa: E402
from mmalign.losses import LOSSES, kto_kl  # noqa: E402
from mmalign.models.lm import completion_logps, load_tokenizer  # noqa: E402

DATA = "assets/data/toy_prefs"
BETA = 0.3


@pytest.fixture(scope="module")
def models():
    tok = load_tokenizer(None)
    cfg = GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=32, n_head=2, bos_token_id=tok.eos_token_id,
                     eos_token_id=tok.eos_token_id, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(0)
    policy = GPT2LMHeadModel(cfg).eval()
    torch.manual_seed(1)
    ref = GPT2LMHeadModel(cfg).eval()  # a *different* reference, so every loss is away from its init value
    return tok, policy, ref


def dpo_trainer(tok, policy, ref, rows, **args):
    from trl import DPOConfig, DPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conf = DPOConfig(output_dir="/tmp/mmalign-trl", report_to="none", per_device_train_batch_size=len(rows),
                         max_length=128, use_cpu=True, bf16=False, beta=BETA, disable_dropout=True, **args)
        return DPOTrainer(model=policy, ref_model=ref, args=conf, train_dataset=Dataset.from_list(rows),
                          processing_class=tok)


def rows_of(fmt, n=8):
    return [json.loads(x) for x in open(f"{DATA}/{fmt}_test.jsonl")][:n]


def trl_batch(trainer, n):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def our_scores(policy, ref, batch):
    with torch.no_grad():
        pol = completion_logps(policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        rf = completion_logps(ref, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    return pol, rf


# (TRL loss_type, extra TRL args, our loss name, our hyper-parameters)
CASES = [
    ("sigmoid", {}, "dpo", {}),
    ("hinge", {}, "hinge", {}),
    ("ipo", {}, "ipo", {"lengths": True}),
    ("exo_pair", {"label_smoothing": 1e-3}, "exo_pair", {"label_smoothing": 1e-3}),
    ("nca_pair", {}, "nca_pair", {}),
    ("robust", {"label_smoothing": 0.1}, "robust", {"label_smoothing": 0.1}),
    ("bco_pair", {}, "bco", {}),
    ("sppo_hard", {}, "sppo_hard", {}),
    ("aot", {}, "aot", {}),
    ("aot_unpaired", {}, "aot_unpaired", {}),
    ("apo_zero", {}, "apo_zero", {}),
    ("apo_down", {}, "apo_down", {}),
    ("discopop", {}, "discopop", {"tau": 0.05}),
    ("sigmoid_norm", {}, "sigmoid_norm", {"lengths": True}),
]


@pytest.mark.parametrize("trl_type,trl_args,ours,hp", CASES, ids=[c[0] for c in CASES])
def test_pairwise_losses_match_trl(models, trl_type, trl_args, ours, hp):
    tok, policy, ref = models
    rows = rows_of("pairs")
    tr = dpo_trainer(tok, policy, ref, rows, loss_type=[trl_type], **trl_args)
    batch = trl_batch(tr, len(rows))
    with torch.no_grad():
        trl_loss = tr._compute_loss(tr.model, batch, False).item()
    pol, rf = our_scores(policy, ref, batch)
    pc, pr = pol.sum().chunk(2)
    rc, rr = rf.sum().chunk(2)
    hp = dict(hp)
    if hp.pop("lengths", False):
        hp["chosen_lengths"], hp["rejected_lengths"] = pol.lengths().chunk(2)
    loss, _ = LOSSES[ours](pc, pr, rc, rr, beta=BETA, **hp)
    assert abs(loss.mean().item()) > 1e-3
    assert loss.mean().item() == pytest.approx(trl_loss, abs=1e-5, rel=1e-5)


F_CASES = [("reverse_kl", "dpo", {}), ("forward_kl", "dpo_forward_kl", {}), ("js_divergence", "dpo_js", {}),
           ("alpha_divergence", "dpo_alpha", {"alpha": 0.3})]


@pytest.mark.parametrize("div,ours,hp", F_CASES, ids=[c[0] for c in F_CASES])
def test_f_divergence_dpo_matches_trl(models, div, ours, hp):
    tok, policy, ref = models
    rows = rows_of("pairs")
    extra = {"f_alpha_divergence_coef": hp["alpha"]} if "alpha" in hp else {}
    tr = dpo_trainer(tok, policy, ref, rows, loss_type=["sigmoid"], f_divergence_type=div, **extra)
    batch = trl_batch(tr, len(rows))
    with torch.no_grad():
        trl_loss = tr._compute_loss(tr.model, batch, False).item()
    pol, rf = our_scores(policy, ref, batch)
    loss, _ = LOSSES[ours](*pol.sum().chunk(2), *rf.sum().chunk(2), beta=BETA, **hp)
    assert loss.mean().item() == pytest.approx(trl_loss, abs=1e-5, rel=1e-5)


def test_ld_dpo_matches_trl_ld_alpha(models):
    tok, policy, ref = models
    rows = rows_of("pairs")
    tr = dpo_trainer(tok, policy, ref, rows, loss_type=["sigmoid"], ld_alpha=0.4)
    batch = trl_batch(tr, len(rows))
    with torch.no_grad():
        trl_loss = tr._compute_loss(tr.model, batch, False).item()
    pol, rf = our_scores(policy, ref, batch)
    pt_c, pt_r = pol.logps.chunk(2)
    rt_c, rt_r = rf.logps.chunk(2)
    m_c, m_r = pol.mask.chunk(2)
    assert not torch.equal(m_c.sum(-1), m_r.sum(-1))  # lengths differ, so alpha matters
    loss, _ = LOSSES["ld_dpo"](pt_c, pt_r, rt_c, rt_r, m_c, m_r, beta=BETA, alpha=0.4)
    assert loss.mean().item() == pytest.approx(trl_loss, abs=1e-5, rel=1e-5)


def test_rpo_matches_trl_sigmoid_plus_sft_at_equal_lengths(models):
    """TRL's SFT term is a batch token-mean, ours is per sequence: equal when chosen lengths are equal."""
    tok, policy, ref = models
    all_rows = [json.loads(x) for x in open(f"{DATA}/pairs_train.jsonl")][:200]
    n_tok = [len(tok(r["chosen"], add_special_tokens=False)["input_ids"]) for r in all_rows]
    common = max(set(n_tok), key=n_tok.count)
    rows = [r for r, n in zip(all_rows, n_tok) if n == common][:6]
    tr = dpo_trainer(tok, policy, ref, rows, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    batch = trl_batch(tr, len(rows))
    with torch.no_grad():
        trl_loss = tr._compute_loss(tr.model, batch, False).item()
    pol, rf = our_scores(policy, ref, batch)
    lc, _ = pol.lengths().chunk(2)
    assert torch.all(lc == lc[0])
    loss, _ = LOSSES["rpo"](*pol.sum().chunk(2), *rf.sum().chunk(2), beta=BETA, sft_weight=0.5, chosen_lengths=lc)
    assert loss.mean().item() == pytest.approx(trl_loss, abs=1e-5, rel=1e-5)


def test_our_tokenisation_matches_trl_collator(models):
    tok, policy, ref = models
    rows = rows_of("pairs", 4)
    tr = dpo_trainer(tok, policy, ref, rows, loss_type=["sigmoid"])
    batch = trl_batch(tr, len(rows))
    ours = TextPreferenceData(f"{DATA}/pairs_test.jsonl", "pairs", tok, max_length=128, max_prompt_length=64)
    ob = ours.collate([ours[i] for i in range(4)])
    t = ob.seqs.input_ids.shape[1]
    assert torch.equal(ob.seqs.input_ids, batch["input_ids"][:, :t])
    assert torch.equal(ob.seqs.completion_mask, batch["completion_mask"][:, :t])
    assert torch.equal(ob.seqs.attention_mask, batch["attention_mask"][:, :t])


@pytest.mark.parametrize("trl_type,ours", [("kto", "kto"), ("apo_zero_unpaired", "apo_zero_unpaired")])
def test_kto_matches_trl(models, trl_type, ours):
    from trl import KTOConfig, KTOTrainer

    tok, policy, ref = models
    rows = rows_of("binary", 8)
    assert {r["label"] for r in rows} == {True, False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conf = KTOConfig(output_dir="/tmp/mmalign-trl-kto", report_to="none", per_device_train_batch_size=8,
                         max_length=128, use_cpu=True, bf16=False, beta=BETA, loss_type=trl_type,
                         desirable_weight=1.3, undesirable_weight=0.7, disable_dropout=True)
        tr = KTOTrainer(model=policy, ref_model=ref, args=conf, train_dataset=Dataset.from_list(rows),
                        processing_class=tok)
    batch = tr.data_collator([tr.train_dataset[i] for i in range(8)])
    with torch.no_grad():
        trl_loss = tr._compute_loss(tr.model, batch, False).item()
    pol, rf = our_scores(policy, ref, batch)
    hp = {"desirable_weight": 1.3, "undesirable_weight": 0.7}
    if ours == "kto":
        with torch.no_grad():
            pk = completion_logps(policy, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
            rk = completion_logps(ref, batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"])
        hp["kl"] = kto_kl(pk.sum(), rk.sum())
    loss, _ = LOSSES[ours](pol.sum(), rf.sum(), torch.as_tensor(batch["label"]), beta=BETA, **hp)
    assert loss.mean().item() == pytest.approx(trl_loss, abs=1e-5, rel=1e-5)
