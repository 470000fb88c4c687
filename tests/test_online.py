"""Online alignment of diffusion and flow models (issue #22): rounds inside one training run, resume mid-round,
2 processes == 1, optimizer state across rounds, the guard, bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.cli import main
from mmalign.config import ConfigError
from mmalign.train.diffusion import run
from mmalign.train.sections import load_config

ROOT = Path(__file__).resolve().parents[1]
SD, FLOW = "configs/tiny/online_sd.yaml", "configs/tiny/online_flow.yaml"


def cfg_(path, out, *ov):
    return load_config(path, [f"train.output_dir={out}", "train.progress=false", *ov])


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "online.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("config,kind", [(SD, "sd"), (SD, "sdxl"), (FLOW, "sd3"), (FLOW, "flux")])
def test_tiny_online_runs_rounds_and_logs_them(tmp_path, config, kind):
    res = run(cfg_(config, tmp_path, f"model.kind={kind}"))
    recs = records(tmp_path)
    assert [r["round"] for r in recs] == [-1, 0, 1] and [r["step"] for r in recs] == [0, 3, 6]
    assert [r["images_sampled"] for r in recs] == [0, 16, 32]
    for r in recs:
        m, lo, hi = r["trained"]
        assert lo <= m <= hi and set(r["panel"]) >= {"world:shapes", "diversity", "saturation", "brightness",
                                                     "latent_norm"}
        assert r["guard"]["stop"] is False
    assert recs[1]["sampled"]["rows"] == 4 and recs[1]["sampled"]["samples"] == 16
    assert res.step == 6 and [h["step"] for h in res.history] == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").exists() and (tmp_path / "online.png").exists()
    assert sorted(p.name for p in (tmp_path / "online").glob("round-*")) == ["round-00000", "round-00001"]


def test_the_cli_runs_the_shipped_tiny_configs(tmp_path):
    for config in (SD, FLOW):
        r = subprocess.run([sys.executable, "-m", "mmalign", "train", config, f"train.output_dir={tmp_path / config}"],
                           cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "online round 1:" in r.stdout and len(records(tmp_path / config)) == 3


def test_optimizer_and_schedule_persist_across_rounds(tmp_path):
    """One optimizer and one LR schedule for the whole run: AdamW's step count is the run's, not a round's."""
    run(cfg_(SD, tmp_path, "train.save_every=6", "train.scheduler=linear", "train.warmup_steps=2"))
    ck = tmp_path / "checkpoints" / "step-00000006"
    opt = load_file(str(ck / "optimizer.safetensors"))
    assert float(opt["state/0/step"]) == 6.0  # reset per round, it would be 3
    state = json.loads((ck / "state.json").read_text())
    assert state["scheduler"]["last_epoch"] == 6 and state["online"]["round_stats"]["1"]["round"] == 1


def test_interrupted_mid_round_and_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    """Killed in the middle of round 1: the resumed run reads round 1's samples back (not redrawn with other
    weights) and ends with the same weights, losses and round log as the run that was never interrupted."""
    from mmalign.train.diffusion import DiffusionRecipe

    full = run(cfg_(SD, tmp_path / "full"))
    run_interrupted(DiffusionRecipe, 4, cfg_(SD, tmp_path / "cut"), monkeypatch)
    round1 = tmp_path / "cut" / "online" / "round-00001" / "latents.safetensors"
    mtime = round1.stat().st_mtime_ns
    resumed = run(cfg_(SD, tmp_path / "cut", "train.resume=latest"))
    assert round1.stat().st_mtime_ns == mtime  # read back, not sampled again
    for (n, a), (_, b) in zip(full.recipe.unet.named_parameters(), resumed.recipe.unet.named_parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), n
    losses = lambda out: [json.loads(x)["train/loss"] for x in (out / "metrics.jsonl").read_text().splitlines()  # noqa: E731
                          if "train/loss" in x]
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("sampled", "eval_seconds")}  # noqa: E731
                        for r in rs]  # (their timings differ)
    assert strip(records(tmp_path / "full")) == strip(records(tmp_path / "cut"))


def run_interrupted(recipe_cls, at_step: int, cfg, monkeypatch):
    """Run ``cfg`` and press Ctrl-C right after optimiser step ``at_step`` (the loop saves a checkpoint and stops)."""
    real = recipe_cls.on_step_end

    def kill(self, step, applied=True):
        real(self, step, applied)
        if step == at_step:
            raise KeyboardInterrupt

    monkeypatch.setattr(recipe_cls, "on_step_end", kill)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(recipe_cls, "on_step_end", real)


@pytest.mark.slow  # cost: launches processes / runs a script end to end
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU gloo check")
def test_two_processes_equal_one_process(tmp_path):
    from tests.test_multiprocess import env, free_port

    common = ["online.prompts_per_batch=1", "train.optimizer=sgd", "train.lr=1", "train.max_grad_norm=null",
              "train.progress=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = subprocess.run([sys.executable, "-m", "mmalign", "train", SD, f"train.output_dir={one}", "train.batch_size=2",
                         "train.grad_accum=2", *common], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                         "--main_process_port", str(free_port()), "-m", "mmalign", "train", SD,
                         f"train.output_dir={two}", "train.batch_size=2", *common],
                        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "2 x 1 accum x 2 proc" in r2.stdout
    for r in (0, 1):  # the same samples, scores and pairs
        a, b = (json.loads((d / "online" / f"round-{r:05d}" / "rows.json").read_text()) for d in (one, two))
        assert a == b
    a = load_file(str(one / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(two / "final" / "pytorch_lora_weights.safetensors"))
    for k in a:
        assert torch.isfinite(a[k]).all() and torch.equal(a[k], b[k]), k


def test_a_round_where_every_image_scores_the_same_is_a_clear_message(tmp_path, capsys):
    argv = ["train", SD, f"train.output_dir={tmp_path}", "train.progress=false",
            "online.reward=py:tests.test_online:constant_reward"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: online round 0: only 0 informative rows")


def constant_reward(images, prompts):
    return [0.5] * len(images)


@pytest.mark.parametrize("override,message", [
    ("online.reward=reward:pickscorr", "online.reward: unknown reward 'pickscorr'"),
    ("online.reward=pickscore", "online.reward: 'pickscore' is not reward:NAME"),
    ("online.panel=world:shapes + reward:toy_clip", "online.panel repeats the trained reward .reward:toy_clip."),
    ("online.samples=1", "online.samples must be >= 2"),
    ("online.prompts=null", "online.prompts: the rounds need prompts to sample from .and reward:toy_clip scores"),
    ("online.reward=world:nowhere", "online.reward: unknown world 'nowhere'"),
    ("online.reward=py:no.such.module:f", "online.reward: py:no.such.module:f cannot be imported"),
    ("train.max_steps=50", "train.max_steps=50, but online rounds train"),
])
def test_bad_online_config_is_one_error_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SD, [override])


def test_group_pairs_hand_values():
    import numpy as np

    from mmalign.rewards.scoring import group_pairs

    s = np.array([0.2, 0.9, 0.1, 0.5])
    assert group_pairs(s) == [(1, 2, pytest.approx(0.8))]
    assert [(w, lo) for w, lo, _ in group_pairs(s, "halves")] == [(1, 2), (3, 0)]
    assert group_pairs(s, "halves", min_margin=0.5) == [(1, 2, pytest.approx(0.8))]
    assert group_pairs(np.array([0.3, 0.3, 0.3])) == []  # ties: no preference
    assert [(w, lo) for w, lo, _ in group_pairs(s, "all", min_margin=0.35)] == [(1, 3), (1, 0), (1, 2), (3, 2)]


def test_the_demo_pairs_its_candidates_as_online_rounds_do():
    """The demo's labelled pairs (``demo.experiment.candidate_pairs``) are ``group_pairs(..., "halves")`` per prompt:
    one pairing rule for offline demo data and online rounds (the demo's own copy of it is gone)."""
    import numpy as np

    from mmalign.demo.experiment import candidate_pairs

    prompts = ["a", "b", "a", "a", "b", "a", "b"]
    scores = [0.2, 0.3, 0.9, 0.1, 0.3, 0.5, 0.8]
    rows = candidate_pairs(list(range(7)), prompts, scores, 0.25, np.random.default_rng(0))
    winners = [(r["caption"], r["jpg_0"] if r["label_0"] == 1.0 else r["jpg_1"],
                r["jpg_1"] if r["label_0"] == 1.0 else r["jpg_0"]) for r in rows]
    # "a": 0.9 (2) vs 0.1 (3), 0.5 (5) vs 0.2 (0) -- margin 0.3 > 0.25; "b": 0.8 (6) vs the later of the tied 0.3s (4)
    assert winners == [("a", 2, 3), ("a", 5, 0), ("b", 6, 4)]
    assert {r["label_0"] for r in rows} <= {0.0, 1.0} and all(r["label_0"] + r["label_1"] == 1.0 for r in rows)


def test_rewards_combine_weighted_and_normalised_within_groups():
    import numpy as np

    from mmalign.rewards.spec import ImageRewards, parse_reward_spec

    terms = parse_reward_spec("2*world:shapes + 0.5*reward:brightness", "k")
    rw = ImageRewards(terms, [None, None])
    s = {"world:shapes": np.array([1.0, 3.0, 10.0, 10.0]), "reward:brightness": np.array([0.0, 1.0, 5.0, 7.0])}
    np.testing.assert_allclose(rw.combine(s), [2.0, 6.5, 22.5, 23.5])  # 2 * world + 0.5 * brightness
    z = rw.combine(s, [[0, 1], [2, 3]])  # each term z-scored within its group: (-1, 1) per group, ties -> 0
    np.testing.assert_allclose(z, [-2.5, 2.5, -0.5, 0.5], atol=1e-6)


def test_guard_stops_when_the_trained_reward_rises_while_the_panel_falls():
    from mmalign.train.guard import Guard

    g = Guard(patience=2)
    g.update(0, (0.10, 0.05, 0.15), {"oracle": (0.50, 0.45, 0.55)})
    g.update(3, (0.20, 0.15, 0.25), {"oracle": (0.60, 0.55, 0.65)})  # both up: the best point so far
    s = g.update(6, (0.30, 0.25, 0.35), {"oracle": (0.52, 0.47, 0.57)})  # 0.52 < 0.55: fallen, trained up
    assert s == {"fallen": ["oracle"], "streak": 1, "best_step": 3, "stop": False}
    s = g.update(9, (0.40, 0.35, 0.45), {"oracle": (0.40, 0.35, 0.45)})
    assert s["stop"] and s["best_step"] == 3 and g.stopped
    h = Guard(patience=2)  # the panel falls while the trained reward falls too: not hacking, no stop
    for i, (t, p) in enumerate([(0.1, 0.5), (0.2, 0.6), (0.1, 0.4), (0.05, 0.3)]):
        s = h.update(i, (t, t - 0.05, t + 0.05), {"oracle": (p, p - 0.05, p + 0.05)})
    assert not s["stop"] and s["streak"] == 0


class _ScriptedSource:
    """A RoundSource whose evaluations follow a script: the trained reward rises every round, the panel falls
    after round 0 -- the pattern of reward hacking."""

    def __init__(self, data):
        self.data, self.evals = data, 0

    def make_round(self, r, step, path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "stats.json").write_text(json.dumps({"step": step, "round": r, "rows": len(self.data), "samples": 8}))

    def load_round(self, path):
        return self.data, json.loads((path / "stats.json").read_text())

    def evaluate(self, step):
        i = step // 2
        panel = 0.5 + 0.1 * i if i <= 1 else 0.6 - 0.2 * (i - 1)
        return {"trained": (0.1 * i, 0.1 * i - 0.01, 0.1 * i + 0.01), "panel": {"p": (panel, panel - 0.01, panel + 0.01)},
                "guarded": ["p"], "metrics": {}}


def test_the_guard_stops_a_run_and_keeps_the_best_rounds_weights(tmp_path):
    """Through the real loop and driver (a toy recipe, a scripted panel): rounds of 2 steps; the panel peaks after
    round 0 (step 2) and falls while the trained reward keeps rising; with guard patience 2 the run stops at
    step 6 and the exported weights are those of step 2."""
    from accelerate import Accelerator

    from mmalign.train.guard import Guard
    from mmalign.train.loop import train
    from mmalign.train.online import OnlineRounds, weight_keeper
    from mmalign.train.recipe import export_final
    from tests.test_nothing_lost import toy_cfg
    from tests.toy_recipe import ToyRecipe

    r = ToyRecipe()
    acc = Accelerator()
    r.acc = acc
    seen = {}
    r.online = OnlineRounds(_ScriptedSource(r.train_data), 5, 2, 8, str(tmp_path), acc, Guard(patience=2),
                            weight_keeper(r))
    real_eval = r.online.evaluate
    r.online.evaluate = lambda step: (seen.setdefault(step, {k: v.clone() for k, v in r.trainable_state().items()}),
                                      real_eval(step))[1]
    res = train(r, toy_cfg(tmp_path, max_steps=10), acc)
    assert res.step == 6  # stopped after two rounds of (trained up, panel fallen)
    r.online.finish()
    for k, v in r.trainable_state().items():
        assert torch.equal(v, seen[2][k]), k  # the weights of the best point (step 2)
    export_final(r, res, acc)
    recs = records(tmp_path)
    assert [x["guard"]["stop"] for x in recs] == [False, False, False, True] and recs[-1]["guard"]["best_step"] == 2


def test_signals_hand_values():
    import numpy as np
    from PIL import Image

    from mmalign.rewards.signals import brightness, diversity, saturation

    red, grey = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (128, 128, 128))
    np.testing.assert_allclose(saturation([red, grey]), [1.0, 0.0])
    np.testing.assert_allclose(brightness([red, grey]), [0.299, 128 / 255], rtol=1e-5)
    assert diversity([red, red]) == 0.0
    np.testing.assert_allclose(diversity([red, grey]), np.sqrt(((1 - 128 / 255) ** 2 + 2 * (128 / 255) ** 2) / 3),
                               rtol=1e-5)


def test_the_online_launch_script_runs_as_is(tmp_path):
    import os

    env = dict(os.environ, PROMPTS="shapes", NUM_GPUS="1")
    r = subprocess.run(["bash", "scripts/train_online.sh", SD, f"train.output_dir={tmp_path}", "online.rounds=1"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "online round 0:" in r.stdout and (tmp_path / "final" / "pytorch_lora_weights.safetensors").exists()


def test_real_online_configs_cite_their_sources_and_bind():
    for path, cite in (("configs/sdxl/online_dpo_lora.yaml", "diffusion_dpo_lora.yaml"),
                       ("configs/sd35/online_dpo_lora.yaml", "config/dpo.py"),
                       ("configs/flux/online_dpo_lora.yaml", "issue #47"),
                       ("configs/sd35/grpo_lora.yaml", "config/grpo.py pickscore_sd3"),
                       ("configs/sd35/nft_lora.yaml", "config/nft.py"),
                       ("configs/sdxl/grpo_lora.yaml", "ddpo-pytorch"),
                       ("configs/flux/nft_lora.yaml", "examples/nft/lora/flux1")):
        cfg = load_config(ROOT / path)
        assert cfg.online.panel and cfg.online.guard == 2 and cite in (ROOT / path).read_text()
        assert cfg.train.max_steps == cfg.online.rounds * cfg.online.steps_per_round


@pytest.mark.slow  # cost: launches processes / runs a script end to end
def test_online_vs_offline_script_prints_a_json_line_per_method(tmp_path):
    r = subprocess.run([sys.executable, "scripts/online_vs_offline_diffusion.py", "--models", "sd", "--seeds", "0",
                        "--rounds", "2", "--samples", "4", "--steps", "2", "--eval-seeds", "2", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [x["method"] for x in rows] == ["offline", "online_dpo"]
    for x in rows:  # equal budget: images sampled and steps
        assert x["images_sampled"] == 2 * 4 * 14 and x["steps"] == 4
        assert {"oracle_all", "oracle_held_out", "oracle_train", "reward_all", "train_seconds"} <= set(x)
    assert (tmp_path / "oracle_vs_step.png").exists() and (tmp_path / "oracle_vs_images.png").exists()


def test_shipped_shapes_training_prompts_leave_out_the_demos_held_out_prompts():
    from mmalign.data.prompts import load_prompts
    from mmalign.demo.settings import HELD_OUT
    from mmalign.toyworld.world import all_prompts

    assert load_prompts("assets/prompts/shapes_train.txt") == [p for p in all_prompts() if p not in HELD_OUT]
    for c in ("online_dpo_shapes_sd", "online_dpo_shapes_sd3", "nft_shapes_sd"):
        assert load_config(f"configs/demo/{c}.yaml").online.prompts == "assets/prompts/shapes_train.txt"
