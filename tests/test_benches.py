"""The benchmark scripts run end to end at toy size and print the ratios their README rows quote (the timings
themselves are not asserted: benchmarks are not timed tests)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_json(*argv: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("JSON ")]
    assert line, p.stdout[-3000:]
    return json.loads(line[-1][5:])


@pytest.mark.slow  # cost: launches processes / runs a script end to end
def test_diffusion_bench_prints_every_ratio_from_one_run():
    out = run_json("scripts/bench_diffusion_dpo.py", "--size", "tiny", "--latent", "8", "--steps", "1",
                   "--repeats", "1", "--ops-layout", "tiny", "--paths",
                   "peer,peer_kept_heap,peer_no_ckpt,salesforce,mmalign_first_pass,mmalign,mmalign_sweep,"
                   "mmalign_precomputed")
    for key in ("speed_ratio_vs_peer", "memory_ratio_vs_peer", "speed_ratio_vs_salesforce", "first_pass_ratio_vs_peer",
                "first_pass_ratio_vs_peer_built_up_front", "memory_ratio_vs_peer_first_pass",
                "speed_ratio_vs_peer_precomputed", "memory_ratio_vs_peer_precomputed", "speed_ratio_vs_peer_kept_heap",
                "first_pass_ratio_vs_peer_kept_heap", "ops_ratio_vs_peer", "ops_ratio_vs_peer_without_optimizer",
                "speed_ratio_vs_peer_sweep",
                "speed_ratio_vs_peer_kept_heap_sweep", "speed_ratio_vs_peer_no_ckpt", "first_pass_ratio_vs_peer_no_ckpt"):
        assert out[key] > 0, key
    paths = out["paths"]
    assert {"peer", "peer_kept_heap", "salesforce", "mmalign_first_pass", "mmalign", "mmalign_sweep",
            "mmalign_precomputed"} <= set(paths)
    assert paths["mmalign_first_pass"]["cache_reused"] == [False] and len(out["first_pass_ratio_vs_peer_per_repeat"]) == 1
    assert all("error" not in s for s in paths.values()), paths
    # the precomputed path reuses the mmalign path's cache (as a sweep does): it builds none itself
    assert paths["mmalign"]["cache_reused"] == [False] and paths["mmalign_precomputed"]["cache_reused"] == [True]
    assert paths["mmalign"]["trainable"] == paths["peer"]["trainable"]  # the same LoRA on both sides
    # a later epoch computes its reference (no earlier step drew its noise); a later run of a sweep reads every
    # step's (1 warm-up + 1 timed) from the record of its first run
    assert paths["mmalign"]["reference_reads"] == [0] and paths["mmalign_sweep"]["reference_reads"] == [2]
    assert len(out["speed_ratio_vs_peer_per_repeat"]) == 1 and out["speed_verdict"].startswith("one repeat")
    # gradient_checkpointing auto, as shipped: decided at the first step, off where the step fits (here)
    for path in ("mmalign", "mmalign_first_pass"):
        assert paths[path]["checkpointing"]["on"] is False and paths[path]["checkpointing"]["activations_mb"] >= 0


def test_diffusion_bench_verdict_needs_every_repeat_to_agree():
    """A ratio whose repeats straddle 1 is noise, not a result (#27: single steps of 4.9-39.9 s beside another job)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_dd", ROOT / "scripts" / "bench_diffusion_dpo.py")
    b = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(b)
    run = lambda *t: {"step_times": list(t)}  # noqa: E731
    # medians per run: peer 6, 4 / ours 5, 5 -> ratios 1.2 and 0.8
    assert b.paired_ratios([run(6, 6, 9), run(4, 1, 4)], [run(5, 5, 5), run(5, 5, 5)]) == [1.2, 0.8]
    assert b.paired_ratios([run(6), {"error": "x"}], [run(3), run(3)]) == [2.0]  # a failed run pairs with nothing
    assert b.verdict([1.2, 0.8]) == "within noise"
    assert b.verdict([1.1, 1.3, 1.05]) == "faster" and b.verdict([0.7, 0.9]) == "slower"
    assert b.verdict([1.5]).startswith("one repeat")


@pytest.mark.slow  # cost: launches processes / runs a script end to end
def test_lm_bench_compares_with_trl_at_the_same_checkpointing():
    out = run_json("scripts/bench_lm_dpo.py", "--layers", "1", "--width", "64", "--heads", "2", "--batch", "4",
                   "--steps", "3", "--gc", "on")
    assert out["speed_ratio_vs_trl_gc_on"] > 0 and "memory_ratio_vs_trl_gc_on" in out
    assert "speed_ratio_vs_trl_gc_off" not in out


@pytest.mark.slow  # cost: launches processes / runs a script end to end
def test_plan_memory_runs_for_every_model_and_method():
    """Every model the GPU plan lists profiles (FLUX's attention dispatch passes query= / key= / value= by keyword,
    which once crashed the SDPA-counting hook), for offline DPO and the online methods."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        r = subprocess.run([sys.executable, "scripts/plan_memory.py", "--resolutions", "512", "--methods", "dpo", "grpo",
                            "nft", "--json", f"{d}/p.json"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        rows = json.loads(open(f"{d}/p.json").read())
    models = ("sd15", "sdxl", "sd35", "flux")  # what the script lists
    assert {(x["model"], x["method"]) for x in rows} == {(m, k) for m in models for k in ("dpo", "grpo", "nft")}
    by = {(x["model"], x["method"]): x for x in rows}
    for m in models:  # online methods hold the VAE, text encoders and reward on the GPU: more than cached DPO
        assert by[(m, "grpo")]["peak_ckpt_gb"] > by[(m, "dpo")]["peak_ckpt_gb"] > 0
        if m != "flux":  # a guided GRPO step is 2 images (6F), an NFT image 4F; FLUX.1-dev has no guidance pair (3F)
            assert by[(m, "nft")]["unit_tflops"] < by[(m, "grpo")]["unit_tflops"]
    # what gradient_checkpointing auto would choose per card: never off on the smaller card and on on the larger
    for x in rows:
        a = x["auto_checkpointing"]
        assert set(a) == {"24", "80"} and set(a.values()) <= {"on", "off", "-"}, a
        assert not (a["24"] == "off" and a["80"] == "on"), x
    assert by[("sd15", "dpo")]["auto_checkpointing"] == {"24": "off", "80": "off"}  # 2.2-3.8 GB: fits anywhere


@pytest.mark.slow  # cost: runs every benchmark of the GPU check at toy size
def test_gpu_check_dry_run_runs_its_whole_plan_on_cpu(tmp_path):
    """`bash scripts/gpu_check.sh --dry-run` is known to work before a GPU is lent: every check returns its JSON."""
    env = dict(os.environ, OUT=str(tmp_path / "gpu.json"), HF_HUB_OFFLINE="1")
    p = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                       env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["_meta"]["dry_run"] is True
    assert {"dpo_1pair", "dpo_4pairs", "xformers", "compile", "storage_fp8", "online"} <= set(res)
    for k in ("dpo_1pair", "dpo_4pairs"):
        assert res[k]["speed_ratio_vs_peer"] > 0 and res[k]["batch"] == (1 if k == "dpo_1pair" else 4), res[k]
    assert res["dpo_1pair"]["speed_ratio_vs_peer_no_ckpt"] > 0  # the peer without --gradient_checkpointing too
    assert "rollout_ratio_vs_pipeline" in json.dumps(res["online"]), res["online"]
    assert "error" not in res["compile"], res["compile"]
    assert "error" not in res["storage_fp8"] and res["storage_fp8"]["memory_ratio_vs_peer"] > 0, res["storage_fp8"]
    assert res["dpo_1pair"]["first_pass_ratio_vs_peer"] > 0, res["dpo_1pair"]
    big = res["storage_big"]
    assert big["flux_fp8_weights_vs_bf16"] < 1 and big["sd35_fp8_weights_vs_bf16"] < 1, big
    assert all(0 < r["pred_rel_err_vs_bf16"] < 0.2 for r in big["rows"] if r["storage"] != "bfloat16"), big
