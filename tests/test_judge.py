"""VLM judge rewards (mmalign.rewards.judge): VQAScore and atom questions, on tiny random VLMs."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.cli import main
from mmalign.data.records import DataError
from mmalign.rewards import REWARDS, load_reward
from mmalign.rewards.judge import QUESTION, JudgeBackbone, VQAScore

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def images(n=3, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32 + 5 * i, 32, 3), dtype=np.uint8)) for i in range(n)]


@pytest.fixture(scope="module")
def judge():
    return load_reward("vqascore", tiny=True, device="cpu")


def by_hand(judge, image, question):
    """P(first token of "Yes") after the question, from the model's logits, without the reward's code path."""
    proc, model = judge.backbone.processor, judge.backbone.model
    enc = proc(text=[question], images=[image.convert("RGB")], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0, -1].double()
    p = torch.softmax(logits, -1)
    yes = proc.tokenizer.encode("Yes", add_special_tokens=False)[0]
    no = proc.tokenizer.encode("No", add_special_tokens=False)[0]
    return p[yes].item(), p[no].item()


def test_vqascore_is_p_yes_after_the_question(judge):
    assert "vqascore" in REWARDS
    ims = images()
    got = judge.score(ims, PROMPTS)
    want = [by_hand(judge, im, QUESTION.format(p))[0] for im, p in zip(ims, PROMPTS)]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-9)
    assert torch.all((got > 0) & (got < 1))
    assert len(set(got.tolist())) == 3  # image and prompt both matter


def test_normalised_score_is_yes_over_yes_and_no(judge):
    norm = VQAScore(judge.backbone, "cpu", normalise="true")  # as it arrives from --reward-arg
    ims = images()
    got = norm.score(ims, PROMPTS)
    for g, im, p in zip(got, ims, PROMPTS):
        y, n = by_hand(judge, im, QUESTION.format(p))
        assert g.item() == pytest.approx(y / (y + n), rel=1e-5)


def test_atoms_score_is_the_mean_over_the_prompts_questions(judge, tmp_path):
    qs = {"a red circle": ["Is the shape red?", "Is it a circle?"], "a blue square": ["Is it blue?"]}
    (tmp_path / "atoms.json").write_text(json.dumps(qs))
    atoms = VQAScore(judge.backbone, "cpu", atoms=str(tmp_path / "atoms.json"))
    ims = images(2)
    got = atoms.score(ims, PROMPTS[:2])
    want0 = np.mean([by_hand(judge, ims[0], q)[0] for q in qs["a red circle"]])
    assert got[0].item() == pytest.approx(want0, rel=1e-5)
    assert got[1].item() == pytest.approx(by_hand(judge, ims[1], "Is it blue?")[0], rel=1e-5)
    with pytest.raises(DataError, match="no questions for the prompt 'a green triangle'"):
        atoms.score(images(1), ["a green triangle"])


def test_bad_judges_and_atoms_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="has no chat template"):
        load_reward("vqascore", tiny=True, device="cpu", family="llava")  # a base LLaVA: no template, not prefix-LM
    for bad in ('{"a red circle": []}', '["a red circle"]', "{not json"):
        (tmp_path / "a.json").write_text(bad)
        with pytest.raises(DataError, match="atoms file"):
            load_reward("vqascore", tiny=True, device="cpu", atoms=str(tmp_path / "a.json"))


def test_a_chat_model_gets_the_question_as_a_user_turn():
    """With a chat template the prompt is the processor's chat rendering of [image, question] + the
    generation prompt, and the score is read at its end."""
    from mmalign.vl.models import tiny_vlm

    model, proc = tiny_vlm("llava")
    proc.chat_template = ("{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                          "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                          "{% if add_generation_prompt %} ASSISTANT:{% endif %}")
    b = JudgeBackbone(model, proc)
    assert b.prompt_format == "chat"
    enc = b.inputs(images(1)[0], "Is it red?")
    text = proc.tokenizer.decode(enc["input_ids"][0])
    assert text.rstrip().endswith("ASSISTANT:") and "Is it red?" in text
    s = VQAScore(b, "cpu").score(images(2), PROMPTS[:2])
    assert s.shape == (2,) and torch.all((s > 0) & (s < 1))


def test_score_and_eval_cli_with_the_tiny_judge(tmp_path, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, im in enumerate(images()):
        im.save(d / f"{i}.png")
    assert main(["score", "--list"]) == 0
    assert "vqascore" in capsys.readouterr().out
    assert main(["score", "--reward", "vqascore", "--tiny", "--images", str(d), "--prompt", "a red circle",
                 "--out", str(tmp_path / "s.csv")]) == 0
    assert "vqascore" in (tmp_path / "s.csv").read_text().splitlines()[0]
    (tmp_path / "atoms.json").write_text(json.dumps({"another prompt": ["Is it red?"]}))
    capsys.readouterr()
    assert main(["score", "--reward", "vqascore", "--tiny", "--images", str(d), "--prompt", "a red circle",
                 "--reward-arg", f"vqascore.atoms={tmp_path / 'atoms.json'}", "--out", str(tmp_path / "t.csv")]) == 1
    err = capsys.readouterr().err
    assert "no questions for the prompt 'a red circle'" in err and "Traceback" not in err
    # eval on the shapes world: the world oracle and the judge side by side, in the summary and the gallery
    for name in ("base", "tuned"):
        f = tmp_path / name
        f.mkdir()
        rows = []
        for k, (p, im) in enumerate(zip(PROMPTS, images(3, seed=len(name)))):
            im.save(f / f"{k}.png")
            rows.append(json.dumps({"file_name": f"{k}.png", "prompt": p, "seed": 0}))
        (f / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    assert main(["eval", "--folder", f"base={tmp_path / 'base'}", "--folder", f"tuned={tmp_path / 'tuned'}",
                 "--reward", "world", "--reward", "vqascore", "--tiny", "--out", str(tmp_path / "e")]) == 0
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert {"world", "vqascore"} <= {r["reward"] for r in summary["rows"]}
    html = next((tmp_path / "e").glob("*.html")).read_text()
    assert "vqascore" in html and "world" in html
