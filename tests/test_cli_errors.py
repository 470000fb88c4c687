"""Bad input at the command line is one ``error:`` line and exit code 1, never a traceback (issue #21, item 14).

Each case is a (name, argv builder) pair; the builder may write the bad file first. ``main`` runs in-process:
an exception escaping it is the traceback a user would have seen.
"""
from __future__ import annotations

import errno
import json

import pytest
from PIL import Image

from mmalign.cli import main

DIFF = "configs/tiny/diffusion_dpo.yaml"
LM = "configs/tiny/lm_dpo.yaml"
PAIRS = "assets/data/shapes_pairs/train.parquet"


def train(tmp, *ov, config=DIFF):
    return ["train", config, f"train.output_dir={tmp / 'run'}", "train.progress=false", "validation.prompts=[]"
            if config == DIFF else "train.eval_every=0", *ov]


def pairs_with(tmp, **change):
    """The shipped pairs with some column values replaced (written as parquet)."""
    import datasets

    ds = datasets.Dataset.from_parquet(PAIRS).select(range(8))
    rows = ds.to_list()
    for r in rows:
        r.update(change)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp / "p.parquet"))
    return tmp / "p.parquet"


def truncated(tmp):
    data = open(PAIRS, "rb").read()
    (tmp / "t.parquet").write_bytes(data[: len(data) // 2])
    return tmp / "t.parquet"


def zero_rows(tmp):
    import datasets

    datasets.Dataset.from_parquet(PAIRS).select([]).to_parquet(str(tmp / "z.parquet"))
    return tmp / "z.parquet"


def config_text(tmp, text):
    (tmp / "c.yaml").write_text(text)
    return str(tmp / "c.yaml")


def folders(tmp, *, corrupt=False, bad_json=False, bad_seed=False):
    """Two sampled-looking folders (images + metadata.jsonl) for ``eval --folder``; one fault in the second."""
    for name in ("a", "b"):
        d = tmp / name
        d.mkdir()
        rows = []
        for i in range(2):
            Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(d / f"{i}.png")
            rows.append(json.dumps({"file_name": f"{i}.png", "prompt": "a red circle", "seed": i}))
        if name == "b":
            if corrupt:
                (d / "1.png").write_bytes(b"not a png")
            if bad_json:
                rows[1] = rows[1][:-3]
            if bad_seed:
                rows[1] = json.dumps({"file_name": "1.png", "prompt": "a red circle", "seed": "one"})
        (d / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return ["eval", "--folder", f"base={tmp / 'a'}", "--folder", f"t={tmp / 'b'}", "--reward", "world",
            "--out", str(tmp / "e")]


def prompts_file(tmp):
    (tmp / "p.txt").write_text("a red circle\n")
    return str(tmp / "p.txt")


def tiny_model(tmp):
    from mmalign.diffusion.models import save_components, tiny_components

    save_components(tiny_components("sd"), tmp / "m")
    return str(tmp / "m")


def text_pairs(tmp, rows):
    (tmp / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp / "t.jsonl")


CASES = {
    # data files
    "truncated parquet": lambda t: train(t, f"data.train={truncated(t)}"),
    "corrupt parquet": lambda t: (t / "x.parquet").write_bytes(b"PAR1 garbage") and train(t, f"data.train={t / 'x.parquet'}"),
    "zero-row parquet": lambda t: train(t, f"data.train={zero_rows(t)}"),
    "string labels": lambda t: train(t, f"data.train={pairs_with(t, label_0='yes', label_1='no')}"),
    "non-string captions": lambda t: train(t, f"data.train={pairs_with(t, caption=7)}"),
    "fewer rows than a batch": lambda t: train(t, "data.max_examples=2", "train.batch_size=4", "data.eval=null"),
    "text pairs all identical": lambda t: train(t, "data.train=" + text_pairs(t, [{"prompt": "q", "chosen": "a",
                                                                                   "rejected": "a"}] * 4), config=LM),
    # configs
    "yaml syntax error": lambda t: ["train", config_text(t, "recipe: lm\nmodel: {tiny: {arch: gpt2}\n")],
    "yaml python tag": lambda t: ["train", config_text(t, "recipe: !!python/object/apply:os.system ['echo hi']\n")],
    "yaml duplicate key": lambda t: ["train", config_text(t, f"base: {__import__('os').path.abspath(LM)}\n"
                                                            "train: {lr: 1.0e-3}\ntrain: {lr: 1.0}\n")],
    "log_every 0": lambda t: train(t, "train.log_every=0"),
    "resolution 0": lambda t: train(t, "data.resolution=0"),
    "seed -1": lambda t: train(t, "train.seed=-1"),
    "lr inf": lambda t: train(t, "train.lr=.inf", config=LM),
    "negative beta": lambda t: train(t, "loss.beta=-1", config=LM),
    "resume latest on a fresh folder": lambda t: train(t, "train.resume=latest", config=LM),
    "output_dir is a file": lambda t: (t / "f").write_text("x") and ["train", LM, f"train.output_dir={t / 'f'}"],
    # outputs
    "score --out is a directory": lambda t: (t / "s.csv").mkdir() or [
        "score", "--reward", "world", "--images", "assets/demo_images", "--out", str(t / "s.csv")],
    "sample --out is a file": lambda t: (t / "o").write_text("x") and [
        "sample", "--model", tiny_model(t), "--prompts", prompts_file(t), "--steps", "1", "--resolution", "32",
        "--out", str(t / "o")],
    # arguments
    "score --batch-size 0": lambda t: ["score", "--reward", "world", "--images", "assets/demo_images",
                                       "--batch-size", "0", "--out", str(t / "s.csv")],
    "sample --steps 0": lambda t: ["sample", "--model", "assets/models/shapes-sd", "--prompts", "shapes",
                                   "--steps", "0", "--out", str(t / "o")],
    "sample --resolution 33": lambda t: ["sample", "--model", "assets/models/shapes-sd", "--prompts", "shapes",
                                         "--resolution", "33", "--out", str(t / "o")],
    "fifa --fraction 0": lambda t: ["data", "fifa", "--data", PAIRS, "--reward", "toy_clip", "--fraction", "0",
                                    "--out", str(t / "f.parquet")],
    "fifa all ties": lambda t: ["data", "fifa", "--data", str(pairs_with(t, label_0=0.5, label_1=0.5)),
                                "--reward", "toy_clip", "--out", str(t / "f.parquet")],
    "caption --model missing": lambda t: ["caption", "--model", str(t / "missing"), "--images", "assets/demo_images"],
    # sampled folders
    "eval folder with a corrupt image": lambda t: folders(t, corrupt=True),
    "eval folder with a bad JSON line": lambda t: folders(t, bad_json=True),
    "eval folder with a non-integer seed": lambda t: folders(t, bad_seed=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_invocation_is_one_error_line_and_exit_1(case, tmp_path, capsys):
    argv = CASES[case](tmp_path)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [x for x in err if x.startswith("error:")]
    assert code == 1 and len(errors) == 1, (case, code, err[-5:])


@pytest.mark.parametrize("where", ["checkpoint", "cache"])
def test_a_full_disk_is_one_error_line_naming_the_path(where, tmp_path, capsys, monkeypatch):
    """ENOSPC while writing a checkpoint or the latent cache: one line with the path, and nothing left half-written
    where a later run would read it."""
    from mmalign.diffusion import cache
    from mmalign.train import checkpoint

    target = checkpoint if where == "checkpoint" else cache

    def full(tensors, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(target, "save_file", full)
    argv = train(tmp_path, "train.max_steps=2", "train.save_every=1", "data.eval=null",
                 f"data.cache_dir={tmp_path / 'cache'}" if where == "cache" else "data.cache_dir=null")
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("error: No space left on device: ") and str(tmp_path) in err[-1]
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*[0-9]")) if where == "checkpoint" else True
