"""Group RL for diffusion and flow models (issue #23): step log-probs by hand, the samplers against the diffusers
pipelines, the objectives' hand values and gradients, ratio 1 on the first inner step, the tiny configs, resume and
2 processes."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmalign.diffusion.sampler import ddim_step, flow_sde_step, gaussian_logp
from mmalign.losses import LOSSES, group_advantages, nft_r
from mmalign.train.diffusion import run
from mmalign.train.sections import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = {"grpo_flow": "configs/tiny/grpo_flow.yaml", "grpo_sd": "configs/tiny/grpo_sd.yaml",
        "nft_flow": "configs/tiny/nft_flow.yaml", "awm_flow": "configs/tiny/awm_flow.yaml"}


def cfg_(name, out, *ov):
    return load_config(TINY[name], [f"train.output_dir={out}", "train.progress=false", *ov])


# ---------------------------------------------------------------------------------------------- step log-probs


def test_flow_sde_step_logp_is_the_gaussian_density_by_hand():
    torch.manual_seed(0)
    x, v, z = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    sigma, sigma_next, a = 0.8, 0.6, 0.7
    nxt, lp, mean, sigma_t = flow_sde_step(x, v, sigma, sigma_next, a, sigma_1=0.95, noise=z)
    st = a * math.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    want_mean = x * (1 + st ** 2 / (2 * sigma) * dt) + v * (1 + st ** 2 * (1 - sigma) / (2 * sigma)) * dt
    s = st * math.sqrt(-dt)
    torch.testing.assert_close(mean, want_mean)
    torch.testing.assert_close(nxt, want_mean + s * z)
    by_hand = [sum(-((float(nxt[n].flatten()[i]) - float(want_mean[n].flatten()[i])) ** 2) / (2 * s * s) - math.log(s)
                   - 0.5 * math.log(2 * math.pi) for i in range(12)) / 12 for n in range(2)]
    torch.testing.assert_close(lp, torch.tensor(by_hand), rtol=1e-6, atol=1e-6)
    # at sigma = 1 the denominator takes the next sigma of the schedule (flow_grpo), so sigma_t stays finite
    _, lp1, _, st1 = flow_sde_step(x, v, 1.0, 0.9, a, sigma_1=0.96, noise=z)
    assert torch.isfinite(lp1).all() and float(st1.flatten()[0]) == pytest.approx(a * math.sqrt(1 / 0.04))


def test_flow_sde_noise_scales_match_the_reference_numbers():
    """SD3.5 (shift 3), 10 steps, a = 0.7 (shared/reference/online-diffusion.md, section 10): sigma_t 3.506 and
    s 0.700 at step 0, s 0.225 at step 8, s 0.0063 at step 9."""
    import diffusers

    sch = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sch.set_timesteps(10)
    sig = sch.sigmas.float()
    x = torch.zeros(1, 1, 1, 1)

    def s_at(i):
        _, _, _, st = flow_sde_step(x, x, sig[i], sig[i + 1], 0.7, float(sig[1]), noise=x)
        return float(st), float(st) * math.sqrt(float(sig[i] - sig[i + 1]))

    assert s_at(0)[0] == pytest.approx(3.506, abs=1e-3) and s_at(0)[1] == pytest.approx(0.700, abs=1e-3)
    assert s_at(8)[1] == pytest.approx(0.225, abs=1e-3) and s_at(9)[1] == pytest.approx(0.0063, abs=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_step_logp_is_the_gaussian_density_by_hand(prediction_type):
    torch.manual_seed(1)
    x, pred, z = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    a, ap, eta = 0.3, 0.5, 1.0
    nxt, lp, mean, std = ddim_step(x, pred, a, ap, eta, prediction_type, noise=z)
    if prediction_type == "epsilon":
        x0, eps = (x - math.sqrt(1 - a) * pred) / math.sqrt(a), pred
    else:
        x0, eps = math.sqrt(a) * x - math.sqrt(1 - a) * pred, math.sqrt(a) * pred + math.sqrt(1 - a) * x
    s = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
    want = math.sqrt(ap) * x0 + math.sqrt(1 - ap - s * s) * eps
    torch.testing.assert_close(mean, want)
    normal = torch.distributions.Normal(want, torch.full_like(want, s))
    torch.testing.assert_close(lp, normal.log_prob(nxt).mean(dim=(1, 2, 3)))
    assert float(std.flatten()[0]) == pytest.approx(s)
    _, lp0, mean0, _ = ddim_step(x, pred, a, ap, 0.0, prediction_type)  # eta 0: the deterministic DDIM step
    assert lp0 is None and torch.allclose(mean0, math.sqrt(ap) * x0 + math.sqrt(1 - ap) * eps)


def test_ddim_noise_scales_match_the_reference_numbers():
    """SD1.5's schedule, 50 DDIM steps, eta 1, steps_offset 1 (section 10): s 0.454 at t 981, 0.288 at 481,
    0.039 at 21, 0.021 at 1."""
    import diffusers

    sch = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                  clip_sample=False, set_alpha_to_one=False)
    sch.set_timesteps(50)
    ac = sch.alphas_cumprod
    x = torch.zeros(1, 1, 1, 1)
    got = {}
    for t in (981, 481, 21, 1):
        prev = t - 20
        ap = ac[prev] if prev >= 0 else sch.final_alpha_cumprod
        got[t] = float(ddim_step(x, x, ac[t], ap, 1.0, noise=x)[3])
    assert got[981] == pytest.approx(0.454, abs=1e-3) and got[481] == pytest.approx(0.288, abs=1e-3)
    assert got[21] == pytest.approx(0.039, abs=1e-3) and got[1] == pytest.approx(0.021, abs=1e-3)


def test_gaussian_logp_is_a_mean_over_dimensions():
    x = torch.zeros(1, 2, 2, 2)
    assert float(gaussian_logp(x, x, torch.ones(1, 1, 1, 1))) == pytest.approx(-0.5 * math.log(2 * math.pi))


# ---------------------------------------------------------------------------------------------- samplers


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux"])
def test_the_step_sampler_without_a_window_is_the_pipelines_sampler(kind):
    from mmalign.diffusion.families import family_for
    from mmalign.diffusion.models import tiny_components
    from mmalign.diffusion.sampler import StepSampler

    comp = tiny_components(kind, seed=0, sample_size=16)
    for m in comp.frozen_modules():  # frozen as the recipe places them (T5's dropout would make encoding random)
        m.eval()
    fam = family_for(comp)
    pipe = comp.pipeline(scheduler="ddim")
    prompts, seeds = ["a red circle", "a blue square"], [3, 4]
    g = 3.5 if kind == "flux" else 3.0
    kw = {"max_sequence_length": fam._t5_length()} if fam.flow else {}  # the T5 length our conditioning uses
    want = pipe(prompts, num_inference_steps=4, guidance_scale=g, height=32, width=32, output_type="latent",
                generator=[torch.Generator().manual_seed(s) for s in seeds], **kw).images
    if kind == "flux":
        want = pipe._unpack_latents(want, 32, 32, pipe.vae_scale_factor)
    got = StepSampler(fam, comp, 4, g, 32, pipe.vae_scale_factor).sample(comp.denoiser, pipe, prompts, seeds).final
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- objectives


def test_group_advantages_hand_values_and_equal_groups():
    r, g = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0, 5.0]), torch.tensor([0, 0, 1, 1, 2, 2])
    a = group_advantages(r, g, global_std=False)
    torch.testing.assert_close(a, torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.0, 0.0]) / (1 + 1e-4) * torch.tensor([1, 1, 0, 0, 0, 0.]))
    std = float(r.std(unbiased=False))
    torch.testing.assert_close(group_advantages(r, g), torch.tensor([-1.0, 1.0, 0, 0, 0, 0]) / (std + 1e-4))
    same = group_advantages(torch.full((8,), 0.7), torch.arange(8) // 4)
    assert torch.equal(same, torch.zeros(8))  # no preference, no NaN


def test_grpo_hand_values_clip_and_gradient():
    lp = torch.log(torch.tensor([1.5, 1.5, 1.0])).requires_grad_()
    old, adv = torch.zeros(3), torch.tensor([1.0, -1.0, 2.0])
    loss, m = LOSSES["grpo"](lp, old, adv, clip_range=0.2, kl=torch.tensor([0.0, 0.0, 0.5]), kl_beta=0.1)
    torch.testing.assert_close(loss, torch.tensor([-1.2, 1.5, -2.0 + 0.05]))  # clipped, unclipped, ratio 1 + KL
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([0.0, 1.5, -2.0]))  # d/dlogp: 0 when clipped, -A ratio otherwise
    assert m["clipfrac"].tolist() == [1.0, 1.0, 0.0]
    steps, _ = LOSSES["grpo"](torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([1.0, 0.0]))  # [B, W] window steps
    torch.testing.assert_close(steps, torch.tensor([-1.0, 0.0]))


def test_awm_is_advantage_weighted_matching_at_ratio_one():
    lp = torch.tensor([-0.3, -0.1, -0.2]).requires_grad_()
    adv = torch.tensor([10.0, -2.0, 1.0])
    loss, m = LOSSES["awm"](lp, lp.detach(), adv, kl=torch.tensor([1.0, 0.0, 0.0]), kl_beta=0.5)
    a = torch.tensor([5.0, -2.0, 1.0]) * 0.2  # clipped to +-5, scaled by 1/5
    torch.testing.assert_close(loss, -a + torch.tensor([0.5, 0.0, 0.0]))
    loss.sum().backward()
    torch.testing.assert_close(lp.grad, -a)


def test_nft_gradient_at_the_old_policy_is_weighted_flow_matching():
    """At v = v_old (flow: x0(v) = x_t - t v), the gradient of the policy term is (2 t^2 / (D w)) clip(A) (v - u),
    u = noise - x0, w = mean |x0(v) - x0|, for any beta (shared/reference/online-diffusion.md section 4)."""
    torch.manual_seed(2)
    x0, noise, v = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    t = torch.tensor([0.2, 0.5, 0.9]).view(-1, 1, 1, 1)
    x_t = (1 - t) * x0 + t * noise
    adv = torch.tensor([1.5, -7.0, 0.0])
    for beta in (1.0, 0.1):
        pred = v.clone().requires_grad_()
        loss, _ = LOSSES["nft"](pred, v, x0, lambda p: x_t - t * p, adv, beta=beta)
        loss.sum().backward()
        w = (x_t - t * v - x0).abs().mean(dim=(1, 2, 3), keepdim=True)
        want = 2 * t ** 2 / (8 * w) * torch.clamp(adv, -5, 5).view(-1, 1, 1, 1) * (v - (noise - x0))
        torch.testing.assert_close(pred.grad, want, rtol=1e-4, atol=1e-6)
    assert nft_r(torch.tensor([5.0, -5.0, 0.0, 9.0])).tolist() == [1.0, 0.0, 0.5, 1.0]


# ---------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_rl_configs_run_two_rounds(tmp_path, name):
    res = run(cfg_(name, tmp_path))
    recs = [json.loads(x) for x in (tmp_path / "online.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [-1, 0, 1] and res.step == 6
    losses = [h["train/loss"] for h in res.history]
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").exists()
    assert recs[1]["sampled"]["samples"] == 16 and "zero_std_groups" in recs[1]["sampled"]


@pytest.mark.parametrize("name", ["grpo_flow", "grpo_sd"])
def test_the_ratio_is_exactly_one_on_the_first_inner_step(tmp_path, name):
    """The rollout and the recomputation use the same weights, precision and module mode (fp32, CPU): before the
    first update every log-prob is recomputed bit for bit, so the ratio is 1 and nothing is clipped."""
    from accelerate import Accelerator

    from mmalign.train.diffusion_rl import DiffusionRLRecipe

    torch.manual_seed(0)
    r = DiffusionRLRecipe(cfg_(name, tmp_path), Accelerator())
    data = r.online.data_for(0, 0)
    batch = data.collate(list(range(len(data))))
    out = r.compute(batch, 0)
    assert torch.equal(out.metrics["ratio"], torch.ones(len(data))), out.metrics["ratio"]
    assert float(out.metrics["clipfrac"].sum()) == 0.0


def test_rl_resume_mid_round_equals_uninterrupted(tmp_path, monkeypatch):
    """NFT (its slow old policy is part of the saved state): killed at step 4 (round 1), resumed, equal weights."""
    from mmalign.train.diffusion_rl import DiffusionRLRecipe
    from tests.test_online import run_interrupted

    full = run(cfg_("nft_flow", tmp_path / "full"))
    run_interrupted(DiffusionRLRecipe, 4, cfg_("nft_flow", tmp_path / "cut"), monkeypatch)
    resumed = run(cfg_("nft_flow", tmp_path / "cut", "train.resume=latest"))
    for (n, a), (_, b) in zip(full.recipe.unet.named_parameters(), resumed.recipe.unet.named_parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), n
    for a, b in zip(full.recipe.old.old, resumed.recipe.old.old):
        assert torch.equal(a, b)


@pytest.mark.slow  # cost: launches processes / runs a script end to end
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU gloo check")
def test_grpo_two_processes_equal_one_process(tmp_path):
    from safetensors.torch import load_file

    from tests.test_multiprocess import env, free_port

    common = ["online.prompts_per_batch=1", "train.optimizer=sgd", "train.lr=1", "train.max_grad_norm=null",
              "train.progress=false"]
    one, two = tmp_path / "one", tmp_path / "two"
    cfg = TINY["grpo_flow"]
    r1 = subprocess.run([sys.executable, "-m", "mmalign", "train", cfg, f"train.output_dir={one}", "train.batch_size=2",
                         "train.grad_accum=2", *common], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                         "--main_process_port", str(free_port()), "-m", "mmalign", "train", cfg, f"train.output_dir={two}",
                         "train.batch_size=2", *common], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert r2.returncode == 0, r2.stderr[-3000:]
    for r in (0, 1):
        a, b = (load_file(str(d / "online" / f"round-{r:05d}" / "samples.safetensors")) for d in (one, two))
        for k in a:
            assert torch.equal(a[k], b[k]), (r, k)
    a = load_file(str(one / "final" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(two / "final" / "pytorch_lora_weights.safetensors"))
    for k in a:
        assert torch.isfinite(a[k]).all() and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("override,message", [
    ("loss.name=grpo", None),
    ("online=null", "loss 'grpo' learns from groups of samples of the current model: set online"),
    ("online.noise_level=0", "online.noise_level and online.eta must be > 0"),
])
def test_rl_config_checks(override, message):
    from mmalign.config import ConfigError

    if message is None:
        assert load_config(TINY["grpo_flow"], [override]).loss.name == "grpo"
        return
    with pytest.raises(ConfigError, match=message):
        load_config(TINY["grpo_flow"], [override, "data.train=assets/data/shapes_pairs/train.parquet"])
