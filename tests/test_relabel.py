"""Reward-augmented relabelling (arXiv 2410.08067): hand-built rows, the CLI, and that DPO on relabelled pairs
learns what the goal asks for (samples conditioned on a high goal are more pleasant than on a low goal)."""
import json

import pytest

from mmalign.cli import main
from mmalign.data.records import DataError
from mmalign.data.relabel import reward_augment

ROWS = [{"prompt": "p1", "chosen": "a", "rejected": "b", "score_chosen": 8, "score_rejected": 3},
        {"prompt": "p2", "chosen": "c", "rejected": "d", "score_chosen": 2, "score_rejected": 5},  # contradicts
        {"prompt": "p3", "chosen": "e", "rejected": "f", "score_chosen": 4, "score_rejected": 4}]  # tie


def test_each_pair_twice_goal_conditioned_contradictions_dropped_ties_kept():
    rows, rep = reward_augment(ROWS, template="<{score:g}> {prompt}")
    assert rep == {"pairs": 3, "dropped_contradicting": 1, "ties_kept": 1, "rows_out": 4}
    assert rows[0] == {"prompt": "<8> p1", "chosen": "a", "rejected": "b", "goal": 8.0}
    assert rows[1] == {"prompt": "<3> p1", "chosen": "b", "rejected": "a", "goal": 3.0}  # y_l > y_w at goal r_l
    assert [r["prompt"] for r in rows[2:]] == ["<4> p3", "<4> p3"]


def test_bad_input_is_named():
    with pytest.raises(DataError, match=r"missing column\(s\) \['score_rejected'\]"):
        reward_augment([{k: v for k, v in ROWS[0].items() if k != "score_rejected"}])
    with pytest.raises(DataError, match="row 0: judge scores must be numbers"):
        reward_augment([{**ROWS[0], "score_chosen": "good"}])
    with pytest.raises(DataError, match="finite"):
        reward_augment([{**ROWS[0], "score_chosen": float("nan")}])
    with pytest.raises(DataError, match="template"):
        reward_augment(ROWS, template="{goal} {prompt}")


def test_cli_writes_rows_and_dpo_learns_the_goal(tmp_path, capsys):
    """Judge = the toy world's pleasantness; after DPO on the relabelled pairs, sampling with the top goal gives
    more pleasant answers on unseen topics than sampling with the bottom goal."""
    from mmalign.models.lm import sample_completions
    from mmalign.toyworld.text import pleasantness, prompts
    from mmalign.train.lm import run
    from mmalign.train.sections import load_config

    judged = tmp_path / "judged.jsonl"
    with open("assets/data/toy_prefs/pairs_train.jsonl") as f:
        rows = [json.loads(line) for line in f]
    judged.write_text("".join(json.dumps({**r, "score_chosen": pleasantness(r["prompt"], r["chosen"]),
                                          "score_rejected": pleasantness(r["prompt"], r["rejected"])}) + "\n"
                              for r in rows))
    out = tmp_path / "aug.jsonl"
    assert main(["data", "relabel", "--data", str(judged), "--out", str(out)]) == 0
    assert "rows out" in capsys.readouterr().out
    aug = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(aug) == 2 * len(rows) and aug[0]["prompt"].startswith("[goal score: ")
    res = run(load_config("configs/tiny/lm_dpo.yaml", [
        f"train.output_dir={tmp_path / 'run'}", "train.progress=false", "model.tiny=null",
        "model.name_or_path=assets/models/toy-lm", f"data.train={out}", "data.eval=null", "train.max_steps=100",
        "train.lr=1.0e-3", "train.batch_size=16", "train.eval_every=0", "loss.beta=1.0", "data.max_length=64"]))
    test = prompts("test")

    def mean_reward(model, tok, goal):
        ps = [f"[goal score: {goal}]\n{p}" for p in test]
        samples = sample_completions(model, tok, ps, 4, max_new_tokens=16, seed=0)
        return sum(pleasantness(p, y) for p, ys in zip(test, samples) for y in ys) / (4 * len(test))

    from transformers import AutoModelForCausalLM

    base = mean_reward(AutoModelForCausalLM.from_pretrained("assets/models/toy-lm").eval(), res.recipe.tokenizer, 2)
    high, low = (mean_reward(res.recipe.policy.eval(), res.recipe.tokenizer, g) for g in (2, -2))
    assert high > base + 0.5 and high > low + 1.0, (base, high, low)
