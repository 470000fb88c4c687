"""Text-LLM path: scoring, the three reference strategies, every loss kind end to end, the tiny run."""
import json
import math

import pytest
import torch
from accelerate import Accelerator

from mmalign.train.sections import load_config
from mmalign.data.records import DataError
from mmalign.data.text import TextPreferenceData
from mmalign.models.lm import completion_logps, load_tokenizer
from mmalign.train.lm import LMRecipe, run
from mmalign.train.loop import train

TINY = "configs/tiny/lm_dpo.yaml"
DATA = "assets/data/toy_prefs"


def tiny_cfg(tmp_path, *overrides):
    return load_config(TINY, [f"train.output_dir={tmp_path}", "train.progress=false", *overrides])


def test_completion_logps_masks_prompt_and_padding():
    tok = load_tokenizer(None)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=1, n_embd=16, n_head=2)).eval()
    ds = TextPreferenceData(f"{DATA}/pairs_test.jsonl", "pairs", tok, 64, 32)
    batch = ds.collate([ds[0], ds[1]])
    lp = completion_logps(model, batch.seqs.input_ids, batch.seqs.attention_mask, batch.seqs.completion_mask)
    # hand computation for row 0: sum of log-softmax at completion positions only
    ids = batch.seqs.input_ids[0]
    n = int(batch.seqs.attention_mask[0].sum())
    with torch.no_grad():
        logits = model(ids[:n].unsqueeze(0)).logits[0].double()
    cm = batch.seqs.completion_mask[0]
    exp = sum(torch.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(1, n) if cm[t])
    assert lp.sum()[0].item() == pytest.approx(exp, rel=1e-5)
    assert lp.lengths()[0].item() == int(cm.sum())
    # padding beyond the sequence contributes nothing
    assert torch.all(lp.logps[0, n - 1:] == 0)


def test_tiny_run_moves_heldout_reward_accuracy(tmp_path):
    cfg = tiny_cfg(tmp_path)
    res = run(cfg)
    first, last = res.eval_history[0], res.eval_history[-1]
    assert first["step"] == 0 and first["eval/loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["eval/reward_accuracy"] == pytest.approx(0.5)
    assert last["eval/reward_accuracy"] >= 0.8, res.eval_history
    assert last["eval/reward_margin"] > 0.5
    assert (tmp_path / "final" / "config.json").exists()
    assert (tmp_path / "metrics.jsonl").exists()


BATCH_CASES = {"dpo": [], "kto": [f"data.train={DATA}/binary_train.jsonl", "loss={name: kto}"],
               "bco_unpaired": [f"data.train={DATA}/binary_train.jsonl", "loss={name: bco_unpaired}"]}


@pytest.mark.parametrize("loss", sorted(BATCH_CASES))
def test_batch8_accum1_equals_batch1_accum8_on_gpt2(tmp_path, loss):
    """Through the real recipe and loop, including KTO's step-level KL point and BCO's running mean
    (3 steps, so the committed mean of steps 1-2 shapes step 3)."""
    finals = []
    for bs, acc in ((8, 1), (1, 8)):
        cfg = tiny_cfg(tmp_path / f"{bs}x{acc}", f"train.batch_size={bs}", f"train.grad_accum={acc}",
                       "train.max_steps=3", "train.optimizer=sgd", "train.lr=0.5", "train.eval_every=0",
                       "data.eval=null", *BATCH_CASES[loss])
        torch.manual_seed(0)
        recipe = LMRecipe(cfg, Accelerator())
        train(recipe, cfg.train, recipe.acc)
        finals.append(torch.cat([p.detach().flatten() for p in recipe.policy.parameters()]))
    torch.testing.assert_close(finals[0], finals[1], rtol=1e-4, atol=1e-6)


# every loss kind goes through the same recipe and learns the held-out preference
KIND_CASES = [
    ("ipo", "pairs", ["loss.beta=0.5"]),
    ("hinge", "pairs", []),
    ("rpo", "pairs", ["loss.sft_weight=0.1"]),
    ("dpo_js", "pairs", []),
    ("kto", "binary", []),
    ("bco", "pairs", []),
    ("bco_unpaired", "binary", []),
    ("lipo", "ranked", []),
    ("pro", "ranked", []),
    ("ld_dpo", "pairs", ["loss.alpha=0.5"]),
    ("sparse_po", "pairs", []),
    ("dove", "joint", []),
    ("d2o", "negatives", []),
    ("simpo", "pairs", []),
]


@pytest.mark.parametrize("loss,fmt,extra", KIND_CASES, ids=[c[0] for c in KIND_CASES])
def test_every_loss_kind_trains(tmp_path, loss, fmt, extra):
    cfg = tiny_cfg(tmp_path, f"loss={{name: {loss}}}", f"data.train={DATA}/{fmt}_train.jsonl",
                   f"data.eval={DATA}/{fmt}_test.jsonl", "train.max_steps=40", "train.eval_every=40",
                   "data.max_eval_examples=64", *(["loss.beta=0.1"] if loss not in ("pro", "simpo") else []), *extra)
    res = run(cfg)
    first, last = res.eval_history[0], res.eval_history[-1]
    assert all(math.isfinite(r["train/loss"]) for r in res.history)
    assert last["eval/loss"] < first["eval/loss"], (first, last)
    assert last["eval/reward_accuracy"] > 0.7, last


def test_mm_dpo_needs_reward_margin_column(tmp_path):
    rows = [json.loads(x) for x in open(f"{DATA}/pairs_train.jsonl")][:64]
    for i, r in enumerate(rows):
        r["reward_margin"] = float(i % 4)
    f = tmp_path / "m.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = tiny_cfg(tmp_path, "loss.name=mm_dpo", f"data.train={f}", "data.eval=null", "train.max_steps=2",
                   "train.eval_every=0")
    res = run(cfg)
    assert math.isfinite(res.history[-1]["train/loss"])
    cfg = tiny_cfg(tmp_path / "b", "loss.name=mm_dpo", "train.max_steps=1", "train.eval_every=0")
    with pytest.raises(ValueError, match="reward_margin"):
        run(cfg)


# ---------------------------------------------------------------- bad input


def write(tmp_path, rows, name="d.jsonl"):
    f = tmp_path / name
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(f)


@pytest.mark.parametrize("rows,fmt,match", [
    ([{"prompt": "p", "chosen": "a"}], "pairs", r"missing column\(s\) \['rejected'\]"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "  ", "rejected": "b"}], "pairs",
     r"row 1: 'chosen' is empty"),
    ([{"prompt": "p", "completion": "a", "label": 0.5}], "binary", r"row 0: 'label' must be"),
    ([{"prompt": "p", "completions": ["a", "b", "c"], "scores": [1, 2]}], "ranked",
     r"row 0: 'completions' has 3 items but 'scores' has 2"),
    ([{"prompt": "p", "completions": ["a"], "scores": [1]}], "ranked", r"at least 2"),
    ([{"prompt": "p", "rejected": "r", "samples": []}], "negatives", r"'samples' must be a non-empty list"),
])
def test_bad_data_is_a_clear_error(tmp_path, rows, fmt, match):
    with pytest.raises(DataError, match=match):
        TextPreferenceData(write(tmp_path, rows), fmt, load_tokenizer(None))


def test_corrupt_jsonl_line_and_missing_file(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        TextPreferenceData(str(f), "pairs", load_tokenizer(None))
    with pytest.raises(DataError, match="cannot load"):
        TextPreferenceData(str(tmp_path / "nope.jsonl"), "pairs", load_tokenizer(None))


def test_parquet_and_saved_dataset_sources(tmp_path):
    import datasets

    rows = [json.loads(x) for x in open(f"{DATA}/pairs_test.jsonl")][:10]
    ds = datasets.Dataset.from_list(rows).rename_column("prompt", "question")
    ds.to_parquet(str(tmp_path / "p.parquet"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    tok = load_tokenizer(None)
    a = TextPreferenceData(str(tmp_path / "p.parquet"), "pairs", tok, columns={"question": "prompt"})
    b = TextPreferenceData(str(tmp_path / "saved"), "pairs", tok, columns={"question": "prompt"})
    assert len(a) == len(b) == 10
    assert a[3]["seqs"] == b[3]["seqs"]


def _gpt2(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=2, resid_pdrop=0,
                                      embd_pdrop=0, attn_pdrop=0))


def test_config_checkpointing_reaches_a_callers_model_and_leaves_the_loss(tmp_path):
    """``model.gradient_checkpointing`` applies to a model passed in (as benches and notebooks do), and
    recomputing activations changes no number."""
    tok = load_tokenizer(None)
    losses, grads = [], []
    for gc in (False, True):
        m = _gpt2(tok)
        recipe = LMRecipe(tiny_cfg(tmp_path, f"model.gradient_checkpointing={str(gc).lower()}"),
                          Accelerator(cpu=True), model=m, tokenizer=tok)
        assert any(getattr(mod, "gradient_checkpointing", False) is True for mod in m.modules()) is gc
        m.train()
        batch = recipe.train_data.collate([recipe.train_data[i] for i in range(4)])
        out = recipe.compute(batch)
        out.loss.mean().backward()
        losses.append(out.loss.detach())
        grads.append(m.transformer.h[0].attn.c_attn.weight.grad.clone())
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_reference_forward_runs_before_the_policy_forward(tmp_path):
    """The reference's full-vocabulary logits are gone before the policy's (kept for backward) are made:
    the step's peak holds one logits tensor, not two."""
    tok = load_tokenizer(None)
    m = _gpt2(tok)
    recipe = LMRecipe(tiny_cfg(tmp_path), Accelerator(cpu=True), model=m, tokenizer=tok)
    order = []
    m.register_forward_hook(lambda *a: order.append("policy"))
    recipe.reference.model.register_forward_hook(lambda *a: order.append("reference"))
    recipe.compute(recipe.train_data.collate([recipe.train_data[i] for i in range(2)]))
    assert order == ["reference", "policy"]
