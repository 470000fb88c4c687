"""The console script and ``python -m mmalign`` are the same CLI; errors exit non-zero with a message."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mmalign.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]


def sh(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "mmalign", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_losses_table_lists_registry():
    from mmalign.losses import LOSSES

    r = sh("losses")
    assert r.returncode == 0
    for name in LOSSES:
        assert f"\n{name} " in "\n" + r.stdout


def test_train_from_cli_with_overrides(tmp_path):
    r = sh("train", "configs/tiny/lm_dpo.yaml", f"train.output_dir={tmp_path}", "train.max_steps=3",
           "train.eval_every=3", "train.log_every=1")
    assert r.returncode == 0, r.stderr[-2000:]
    recs = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    assert [x["step"] for x in recs if "train/loss" in x] == [1, 2, 3]
    assert "reward_accuracy" in r.stdout  # the before/after table


def test_train_runs_from_another_directory(tmp_path):
    """Shipped configs refer to assets/... relative to the repo; that must work from any cwd."""
    r = sh("train", str(ROOT / "configs/tiny/lm_dpo.yaml"), f"train.output_dir={tmp_path}/o", "train.max_steps=1",
           "train.eval_every=0", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


def test_bad_config_exits_1_with_message(tmp_path):
    r = sh("train", "configs/tiny/lm_dpo.yaml", "loss.name=nope")
    assert r.returncode == 1
    assert "unknown loss 'nope'" in r.stderr


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = [line for line in readme.splitlines() if "pytest" in line][0].strip().strip("`")
    assert test_cmd.split("&&")[-1].strip() in ci


HELP = [[c.name] for c in COMMANDS] + [["data", t] for t in ("fifa", "dcpo", "rpo-pairs", "bdhs")]


@pytest.mark.parametrize("argv", HELP, ids=[" ".join(a) for a in HELP])
def test_every_command_has_working_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--help"])
    assert e.value.code == 0
    assert "usage: mmalign " + " ".join(argv) in capsys.readouterr().out


def test_help_is_fast_and_loads_no_torch():
    """Building the parser imports only the command modules; libraries load when a command runs."""
    code = "import sys; from mmalign.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-1000:]


def test_bad_input_is_one_error_line(tmp_path):
    r = sh("score", "--reward", "clipscore", "--images", str(tmp_path / "nothing"), "--out", str(tmp_path / "s.csv"))
    assert r.returncode == 1 and r.stderr.strip().startswith("error: no images found") and "Traceback" not in r.stderr
