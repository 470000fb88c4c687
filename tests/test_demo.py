"""`mmalign demo`: Diffusion-DPO on the shipped base model measurably improves prompt following."""
import json

import pytest

from mmalign.demo.run import DemoSettings, run_demo


@pytest.mark.slow
def test_demo_improves_the_oracle_score(tmp_path):
    rep = run_demo(DemoSettings(out=str(tmp_path)))
    t = {r["split"]: r for r in rep["table"]}
    allp, held = t["all prompts"], t["held-out prompts"]
    # measured with seed 0: oracle 0.766 -> 0.837, accuracy 0.764 -> 0.903, win rate 0.590
    assert allp["tuned_score"] >= allp["base_score"] + 0.03
    assert allp["tuned_accuracy"] >= allp["base_accuracy"] + 0.05
    assert allp["win_rate"] > 0.5
    assert held["tuned_score"] > held["base_score"]  # generalises to prompts held out of training
    for f in ("grid.png", "reward_curve.png", "pairs.parquet", "report.json"):
        assert (tmp_path / f).exists()
    assert json.loads((tmp_path / "report.json").read_text())["pairs"] >= 100
