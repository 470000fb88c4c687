"""Flow-matching Diffusion-DPO (SD3 / SD3.5 and FLUX.1 layouts) through the one diffusion engine."""
from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from mmalign.config import ConfigError
from mmalign.train.sections import load_config
from mmalign.diffusion.families import FlowFamily, latent_image_ids, pack_latents, unpack_latents
from mmalign.diffusion.models import tiny_components
from mmalign.train.diffusion import DiffusionRecipe, run
from mmalign.train.loop import train

CONFIGS = {"sd3": "configs/tiny/flow_dpo.yaml", "flux": "configs/tiny/flux_dpo.yaml"}


def cfg_(kind, tmp_path, *ov):
    return load_config(CONFIGS[kind], [f"train.output_dir={tmp_path}", "train.progress=false", "validation.prompts=[]",
                                       *ov])


def recipe_(kind, tmp_path, *ov):
    torch.manual_seed(0)
    return DiffusionRecipe(cfg_(kind, tmp_path, *ov), Accelerator())


def batch_of(r, n=4, data=None):
    data = data or r.train_data
    return data.collate([data[i] for i in range(n)]).to(r.acc.device)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
@pytest.mark.parametrize("lora", [True, False])
def test_step0_loss_is_ln2_and_accuracy_half(tmp_path, kind, lora):
    r = recipe_(kind, tmp_path, *([] if lora else ["model.lora=null"]))
    out = r.compute(batch_of(r, 4), step=0)
    torch.testing.assert_close(out.loss, torch.full_like(out.loss, math.log(2)), rtol=0, atol=1e-4)
    assert torch.all(out.metrics["reward_accuracy"] == 0.5)
    assert (out.metrics["model_mse_w"] != out.metrics["model_mse_l"]).any()  # real, different images


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_prompt_embeddings_equal_the_pipelines_encode_prompt(tmp_path, kind):
    """The conditioning the recipe trains on is exactly what the diffusers pipeline builds for inference."""
    r = recipe_(kind, tmp_path)
    b = batch_of(r, 4)
    _, _, _, cond = r.inputs.build(b, [r.inputs.generator(0, int(i), "train") for i in b.index], "train")
    pipe = r.comp.pipeline()
    if kind == "sd3":
        e, _, p, _ = pipe.encode_prompt(b.captions, None, None, device="cpu", do_classifier_free_guidance=False,
                                        max_sequence_length=r.family._t5_length())
        ids = None
    else:
        e, p, ids = pipe.encode_prompt(b.captions, None, device="cpu", max_sequence_length=r.family._t5_length())
    torch.testing.assert_close(cond.embeds[:4], e)
    torch.testing.assert_close(cond.embeds[4:], e)  # winner and loser share the prompt
    torch.testing.assert_close(cond.pooled[:4], p)
    if ids is not None:
        torch.testing.assert_close(cond.txt_ids, ids)
    assert cond.embeds.shape[1] >= 16  # T5 tokens are part of the sequence (SD3: CLIP + T5, Flux: T5)


def test_flux_packing_and_ids_match_the_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(3, 4, 8, 6)
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 3, 4, 8, 6))
    torch.testing.assert_close(unpack_latents(packed, 8, 6), x)
    torch.testing.assert_close(FluxPipeline._unpack_latents(packed, 16, 12, 2), x)  # pixels = 2 x latents here
    torch.testing.assert_close(latent_image_ids(8, 6, "cpu", torch.float32),
                               FluxPipeline._prepare_latent_image_ids(3, 4, 3, "cpu", torch.float32))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 4, 7, 6))


def test_flow_target_sigma_schedule_and_model_inputs():
    """x_t = (1 - s) x0 + s eps, target eps - x0; s from the scheduler (SD3: static shift 3, applied; Flux:
    dynamic shifting, so training sees the unshifted sigmas); SD3 is told t = 1000 s, Flux s and its guidance."""
    sd3, flux = FlowFamily(tiny_components("sd3")), FlowFamily(tiny_components("flux"), guidance=2.5)
    base = torch.linspace(1.0, 1 / 1000, 1000)
    torch.testing.assert_close(sd3.sigmas, 3 * base / (1 + 2 * base))
    torch.testing.assert_close(flux.sigmas, base)
    x0, eps, s = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([0.25, 0.9])
    xt, target = sd3.noisy_and_target(x0, eps, s)
    torch.testing.assert_close(xt, torch.stack([0.75 * x0[0] + 0.25 * eps[0], 0.1 * x0[1] + 0.9 * eps[1]]))
    torch.testing.assert_close(target, eps - x0)
    seen = {}

    class Spy(torch.nn.Module):
        config = type("C", (), {"guidance_embeds": True})()

        def forward(self, **kw):
            seen.update(kw)
            out = kw["hidden_states"]
            return type("O", (), {"sample": out})()

    cond = type("Cond", (), {"embeds": torch.zeros(2, 3, 32), "pooled": torch.zeros(2, 32), "txt_ids": torch.zeros(3, 3)})
    out = flux.predict(Spy(), xt, s, cond)
    torch.testing.assert_close(out, xt)  # pack -> identity model -> unpack
    torch.testing.assert_close(seen["timestep"], s)
    torch.testing.assert_close(seen["guidance"], torch.full((2,), 2.5))
    assert seen["hidden_states"].shape == (2, 16, 16) and seen["img_ids"].shape == (16, 3)
    sd3.predict(Spy(), xt, s, cond)
    torch.testing.assert_close(seen["timestep"], s * 1000)


@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode"])
def test_timestep_sampling_is_keyed_and_distributed_as_named(scheme):
    fam = FlowFamily(tiny_components("sd3"), timestep_sampling=scheme, logit_mean=0.0, logit_std=1.0)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4000)]  # noqa: E731
    _, s1 = fam.draw((4, 2, 2), gens(), "cpu")
    _, s2 = fam.draw((4, 2, 2), gens(), "cpu")
    assert torch.equal(s1, s2)  # keyed by the pair's generator
    u = torch.stack([fam.sample_u(g, 1) for g in gens()]).flatten()
    assert 0 <= float(u.min()) and float(u.max()) < 1
    if scheme == "uniform":
        assert abs(float(u.mean()) - 0.5) < 0.02 and abs(float(u.std()) - (1 / 12) ** 0.5) < 0.02
    elif scheme == "logit_normal":
        z = torch.logit(u)
        assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1.0) < 0.05
    else:  # mode sampling (SD3 paper) with scale 1.29 puts more mass in the middle than uniform
        assert float(((u > 0.25) & (u < 0.75)).float().mean()) > 0.55
    assert set(s1.unique().tolist()) <= set(fam.sigmas.tolist())  # sigmas come from the scheduler's table


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_lora_export_loads_with_the_family_pipeline(tmp_path, kind):
    res = run(cfg_(kind, tmp_path, "train.max_steps=3", "train.eval_every=0", "train.lr=0.05"))
    trained = res.recipe.unet
    fresh = tiny_components(kind, seed=0, sample_size=16)
    pipe = fresh.pipeline()
    base_out, lora_out, ours = [], [], []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    fam = res.recipe.family
    c = fam.encode_prompts(pipe, ["a red circle", "a blue square"], "cpu")
    with torch.no_grad():
        base_out = fam.predict(pipe.transformer, x, torch.tensor([0.3, 0.7]), c)
        pipe.load_lora_weights(str(tmp_path / "final"))
        lora_out = fam.predict(pipe.transformer, x, torch.tensor([0.3, 0.7]), c)
        ours = fam.predict(trained, x, torch.tensor([0.3, 0.7]), c)
    torch.testing.assert_close(lora_out, ours, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(lora_out, base_out, atol=1e-4)  # the export changes the output


def test_interrupted_and_resumed_equals_uninterrupted_flux(tmp_path):
    common = ["train.max_steps=5", "train.eval_every=0", "data.eval=null", "data.caption_dropout=0.3"]
    full = recipe_("flux", tmp_path / "full", *common)
    train(full, full.cfg.train, full.acc)
    a = recipe_("flux", tmp_path / "run", *common)

    def stop(step, rec):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(a, a.cfg.train, a.acc, on_step=stop)
    b = recipe_("flux", tmp_path / "run", *common, "train.resume=latest")
    train(b, b.cfg.train, b.acc)
    for (n1, p1), (_, p2) in zip(full.unet.named_parameters(), b.unet.named_parameters()):
        if p1.requires_grad:
            assert torch.equal(p1, p2), n1


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_latent_cache_equals_pixels(tmp_path, kind):
    """Latents cached unpacked (Flux packs at step time) in fp32; text cached; equal to the uncached path."""
    base = ["data.max_examples=8", "data.eval=null", "data.caption_dropout=0.5"]
    r_pix = recipe_(kind, tmp_path / "pix", *base)
    r_cache = recipe_(kind, tmp_path / "c", *base, f"data.cache_dir={tmp_path / 'cache'}")
    for step in (0, 1, 2):
        a = r_pix.compute(batch_of(r_pix, 6), step=step).metrics
        b = r_cache.compute(batch_of(r_cache, 6), step=step).metrics
        torch.testing.assert_close(a["model_mse_w"], b["model_mse_w"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a["model_mse_l"], b["model_mse_l"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_methods_that_need_a_unet_are_clear_errors(tmp_path, kind):
    with pytest.raises(ConfigError, match="DDIM-InPO.*flow-matching"):
        cfg_(kind, tmp_path, "inversion={steps: 10}")
    with pytest.raises(ConfigError, match="ppd"):
        cfg_(kind, tmp_path, "ppd={encoder: toy_clip}", "data.train=assets/data/shapes_pairs/users.parquet")
    with pytest.raises(ConfigError, match="prediction_type"):
        cfg_(kind, tmp_path, "model.prediction_type=epsilon")


@pytest.mark.parametrize("kind", ["sd", "sd3", "flux"])
def test_lora_keeps_frozen_weights_in_half_precision(tmp_path, kind):
    """Under LoRA with bf16 mixed precision the base denoiser, VAE and text encoders are bf16, LoRA is fp32."""
    path = "configs/tiny/diffusion_dpo.yaml" if kind == "sd" else CONFIGS[kind]
    cfg = load_config(path, [f"train.output_dir={tmp_path}", "train.mixed_precision=bf16", "validation.prompts=[]",
                             "data.eval=null", "train.max_steps=1", "train.eval_every=0", "train.progress=false"])
    res = run(cfg)
    r = res.recipe
    lora = {p.dtype for n, p in r.unet.named_parameters() if "lora" in n}
    base = {p.dtype for n, p in r.unet.named_parameters() if "lora" not in n}
    assert lora == {torch.float32} and base == {torch.bfloat16}
    assert {p.dtype for m in r.comp.frozen_modules() for p in m.parameters()} == {torch.bfloat16}
    assert math.isfinite(res.history[-1]["train/loss"])
