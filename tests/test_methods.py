"""The Diffusion-DPO method family: each method's distinguishing computation, plus tiny end-to-end runs."""
import math
from types import SimpleNamespace

import pytest
import torch

from mmalign.config import ConfigError
from mmalign.train.sections import load_config
from mmalign.toyworld.world import synthetic_pairs
from mmalign.diffusion.data import write_pickapic_parquet
from mmalign.diffusion.inversion import ddim_invert, inversion_grid
from mmalign.diffusion.models import tiny_components
from mmalign.train.diffusion import DiffusionRecipe, run

TINY = "configs/tiny/diffusion_dpo.yaml"


def cfg_(tmp_path, *ov):
    return load_config(TINY, [f"train.output_dir={tmp_path}", "train.progress=false", "validation.prompts=[]", *ov])


# ---------------------------------------------------------------- DDIM-InPO


class ConstantEps(torch.nn.Module):
    """A perfect noise predictor for one fixed trajectory: always returns eps*."""

    def __init__(self, eps):
        super().__init__()
        self.eps = eps

    def forward(self, x, t, **kw):
        return SimpleNamespace(sample=self.eps.expand_as(x))


def test_inversion_grid():
    assert inversion_grid(1000, 10) == [1, 101, 201, 301, 401, 501, 601, 701, 801, 901]


def test_eps_hat_is_the_true_noise_when_inversion_is_exact():
    ac = tiny_components("sd").noise_scheduler.alphas_cumprod
    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(1, 4, 8, 8)
    t = torch.tensor([0, 57, 500, 999])
    x_t, eps_hat = ddim_invert(ConstantEps(eps), x0, t, {}, ac, steps=10, eta=0.0, exact_t=True)
    torch.testing.assert_close(eps_hat, eps.expand_as(eps_hat), rtol=1e-4, atol=1e-4)
    a = ac[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=1e-4, atol=1e-4)
    # the reference code's variant stops at the grid point below t, so its eps_hat is off
    _, eps_code = ddim_invert(ConstantEps(eps), x0, t, {}, ac, steps=10, eta=0.0, exact_t=False)
    assert (eps_code[2] - eps[0]).abs().max() > 1e-2
    # eta > 0 adds noise, keyed by the generators
    g = lambda: [torch.Generator().manual_seed(i) for i in range(4)]  # noqa: E731
    a1, _ = ddim_invert(ConstantEps(eps), x0, t, {}, ac, eta=0.1, generators=g())
    a2, _ = ddim_invert(ConstantEps(eps), x0, t, {}, ac, eta=0.1, generators=g())
    assert torch.equal(a1, a2) and not torch.allclose(a1[2], x_t[2])


def test_inpo_recipe_step0_is_ln2_and_trains(tmp_path):
    res = run(cfg_(tmp_path, "inversion={steps: 10, eta: 0.1}", "train.max_steps=3", "train.eval_every=3",
                   "train.log_every=1"))
    assert res.eval_history[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert res.history[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert all(math.isfinite(r["train/loss"]) for r in res.history)


def test_inpo_config_guards(tmp_path):
    with pytest.raises(ConfigError, match="cannot be precomputed"):
        cfg_(tmp_path, "inversion={}", "model.reference=precomputed", "data.noise_draws=1")
    with pytest.raises(ConfigError, match="epsilon"):
        cfg_(tmp_path, "inversion={}", "model.prediction_type=v_prediction")


# ---------------------------------------------------------------- DCPO


def dual_caption_parquet(path, n=8):
    rows = synthetic_pairs(n, seed=7)
    for i, r in enumerate(rows):
        r["caption_0"], r["caption_1"] = f"caption zero {i}", f"caption one {i}"
    write_pickapic_parquet(path, rows)
    return rows


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_dcpo_passes_each_image_its_own_caption(tmp_path, kind):
    rows = dual_caption_parquet(tmp_path / "dual.parquet")
    torch.manual_seed(0)
    r = DiffusionRecipe(cfg_(tmp_path / "r", f"model.kind={kind}", f"data.train={tmp_path / 'dual.parquet'}",
                             "data.eval=null", "data.dual_captions=true"), __import__("accelerate").Accelerator())
    b = r.train_data.collate([r.train_data[i] for i in range(8)])
    for i in range(8):
        winner_is_0 = rows[i]["label_0"] == 1.0
        assert b.captions[i] == f"caption {'zero' if winner_is_0 else 'one'} {i}"
        assert b.captions_rejected[i] == f"caption {'one' if winner_is_0 else 'zero'} {i}"
    gens = [r.inputs.generator(0, int(i), "train") for i in b.index]
    _, _, _, cond = r.inputs.build(b, gens, "train")
    enc = lambda caps: r.inputs.encode_text(caps).embeds  # noqa: E731
    w, l_ = cond.embeds.chunk(2)
    torch.testing.assert_close(w, enc(b.captions))
    torch.testing.assert_close(l_, enc(b.captions_rejected))
    if kind == "sdxl":  # SDXL gets both captions too (the reference code uses one)
        pw, pl = cond.pooled.chunk(2)
        assert not torch.allclose(pw, pl)


def test_dcpo_end_to_end(tmp_path):
    dual_caption_parquet(tmp_path / "dual.parquet", n=12)
    res = run(cfg_(tmp_path / "r", f"data.train={tmp_path / 'dual.parquet'}", "data.eval=null",
                   "data.dual_captions=true", "train.max_steps=3", "train.eval_every=0"))
    assert res.step == 3
    with pytest.raises(Exception, match=r"caption_0"):
        run(cfg_(tmp_path / "r2", "data.dual_captions=true", "train.max_steps=1", "train.eval_every=0"))


# ---------------------------------------------------------------- PPD


def user_pairs(path, n=16):
    rows = synthetic_pairs(n, seed=11)
    for i, r in enumerate(rows):
        r["user_id"] = f"user{i % 2}"
    write_pickapic_parquet(path, rows)


def ppd_recipe(tmp_path, *ov):
    user_pairs(tmp_path / "users.parquet")
    torch.manual_seed(0)
    import accelerate

    return DiffusionRecipe(cfg_(tmp_path / "r", f"data.train={tmp_path / 'users.parquet'}", "data.eval=null",
                               "ppd={encoder: clipscore, encoder_tiny: true, examples_per_user: 3, n_tokens: 2}", *ov),
                           accelerate.Accelerator())


def test_ppd_starts_at_ln2_and_output_depends_on_user_and_interpolates(tmp_path):
    from mmalign.diffusion.users import interpolate, with_user_tokens

    r = ppd_recipe(tmp_path)
    assert set(r.user_emb) == {"user0", "user1"}
    b = r.train_data.collate([r.train_data[i] for i in range(4)])
    out = r.compute(b, step=0)
    torch.testing.assert_close(out.loss, torch.full_like(out.loss, math.log(2)), rtol=0, atol=1e-5)
    with torch.no_grad():  # as after some training: the user branch is active
        for p in r.unet.parameters():
            if p.requires_grad and p.dim() == 2 and not p.any():
                p.normal_(0, 0.2)
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([400])
    text = r.inputs.encode_text(["a red circle"]).embeds

    def f(e):
        with torch.no_grad():
            return r.unet(x, t, encoder_hidden_states=with_user_tokens(text, e.view(1, -1), r.unet)).sample

    e0, e1 = r.user_emb["user0"], r.user_emb["user1"]
    y0, y1 = f(e0), f(e1)
    assert (y0 - y1).abs().max() > 1e-3  # the user embedding changes the output
    torch.testing.assert_close(f(interpolate(e0, e1, 0.0)), y0)
    torch.testing.assert_close(f(interpolate(e0, e1, 1.0)), y1)
    ys = [f(interpolate(e0, e1, a)) for a in (0.0, 0.25, 0.5, 0.75, 1.0)]
    to0 = [float((y - y0).norm()) for y in ys]
    to1 = [float((y - y1).norm()) for y in ys]
    assert to0[0] < to0[1] < to0[2] and to1[2] > to1[3] > to1[4]  # leaves user 0, arrives at user 1
    step = float((f(interpolate(e0, e1, 0.51)) - ys[2]).norm())
    assert step < 0.1 * float((y1 - y0).norm())  # continuous in alpha


def test_ppd_trains_and_exports_user_branch(tmp_path):
    from mmalign.diffusion.users import load_user_branch, sample_for_user

    user_pairs(tmp_path / "users.parquet")
    res = run(cfg_(tmp_path / "r", f"data.train={tmp_path / 'users.parquet'}", "data.eval=null",
                   "ppd={encoder: clipscore, encoder_tiny: true, examples_per_user: 3, n_tokens: 2}",
                   "train.max_steps=3", "train.eval_every=0", "train.lr=0.05"))
    final = tmp_path / "r" / "final"
    assert (final / "user_branch.safetensors").exists() and (final / "pytorch_lora_weights.safetensors").exists()
    comp = tiny_components("sd", seed=0, sample_size=16)
    emb = load_user_branch(comp.unet, final)
    pipe = comp.pipeline()
    pipe.load_lora_weights(str(final))
    ims = sample_for_user(pipe, ["a red circle"], emb["user0"], [torch.Generator().manual_seed(0)], steps=2)
    assert ims[0].size == (32, 32)
    trained = res.recipe.unet.user_tokens.proj.weight
    torch.testing.assert_close(comp.unet.user_tokens.proj.weight, trained.detach())


# ---------------------------------------------------------------- RPO


def test_soft_labels_are_per_pair_label_smoothing():
    from mmalign.losses import LOSSES

    pc, pr, rc, rr = torch.tensor([-1.0, -1.0]), torch.tensor([-2.0, -2.0]), torch.zeros(2), torch.zeros(2)
    y = torch.tensor([1.0, 0.0])
    loss, _ = LOSSES["rpo"](pc, pr, rc, rr, beta=1.0, sft_weight=0.0, label_smoothing=1 - y)
    x = torch.tensor(1.0)
    torch.testing.assert_close(loss, torch.stack([-torch.nn.functional.logsigmoid(x), -torch.nn.functional.logsigmoid(-x)]))
    with pytest.raises(ValueError, match="per-pair label_smoothing"):
        LOSSES["dpo"](pc, pr, rc, rr, label_smoothing=torch.tensor([1.5, 0.0]))


def test_rpo_soft_labels_independent_noise_and_reconstruction(tmp_path):
    rows = synthetic_pairs(8, seed=12)
    for i, r in enumerate(rows):
        r["label_0"], r["label_1"] = float(i % 2), float(1 - i % 2)  # y: reference image preferred or not
    write_pickapic_parquet(tmp_path / "rpo.parquet", rows)
    import accelerate

    r = DiffusionRecipe(cfg_(tmp_path / "r", f"data.train={tmp_path / 'rpo.parquet'}", "data.eval=null",
                             "data.label_mode=soft", "data.shared_noise=false", "loss={name: rpo, beta: 2.0, sft_weight: 1.0}"),
                        accelerate.Accelerator())
    b = r.train_data.collate([r.train_data[i] for i in range(8)])
    assert b.labels.tolist() == [float(i % 2) for i in range(8)]  # order kept, labels passed through
    gens = [r.inputs.generator(0, int(i), "train") for i in b.index]
    _, noise, t, _ = r.inputs.build(b, gens, "train")
    assert noise.shape[1] == 2 and t.shape == (8, 2) and not torch.equal(noise[:, 0], noise[:, 1])
    with torch.no_grad():
        for n, p in r.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    out = r.compute(b, step=0)
    m = out.metrics
    inside = 0.5 * 2.0 * ((-m["model_mse_w"] + m["ref_mse_w"]) - (-m["model_mse_l"] + m["ref_mse_l"]))
    y = b.labels
    exp = -(y * torch.nn.functional.logsigmoid(inside) + (1 - y) * torch.nn.functional.logsigmoid(-inside)) \
        + m["model_mse_w"]  # + the reconstruction (SFT) term on the reference image
    torch.testing.assert_close(out.loss, exp, rtol=1e-5, atol=1e-6)


def test_reward_based_checkpoint_selection_picks_the_best_step(tmp_path):
    """lambda-harmonic-style selection: /best holds the best-reward step; patience 3 stops the run."""
    rewards = iter([0.30, 0.50, 0.40, 0.65, 0.20, 0.10, 0.05, 0.90, 0.90, 0.90, 0.90])
    res = run(cfg_(tmp_path, "train.max_steps=20", "train.eval_every=2", "validation.prompts=[a red circle]",
                   "validation.select_best=true", "validation.patience=3", "validation.num_inference_steps=1",
                   "validation.images_per_prompt=1"),
              scorer=lambda ims, ps: [next(rewards)] * len(ims))
    r = res.recipe
    assert r.validator.best_step == 6 and r.validator.best_reward == pytest.approx(0.65)
    assert [e["step"] for e in res.eval_history if "eval/reward" in e] == [0, 2, 4, 6, 8, 10, 12]
    assert res.step == 12 and r.stop  # stopped early, 8 steps before max_steps
    card = (tmp_path / "best" / "README.md").read_text()
    assert "step: 6" in card and "reward: 0.65" in card
    assert (tmp_path / "best" / "pytorch_lora_weights.safetensors").exists()


def test_configured_validation_reward_drives_selection(tmp_path):
    """validation.reward from the config (no scorer passed in code) is scored each evaluation and selects /best."""
    from PIL import Image

    refs = tmp_path / "refs"
    refs.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(refs / "ref.png")
    res = run(cfg_(tmp_path, "train.max_steps=2", "train.eval_every=2", "validation.prompts=[a red circle]",
                   "validation.select_best=true", "validation.num_inference_steps=1", "validation.images_per_prompt=1",
                   "validation.reward=lambda_harmonic", "validation.reward_args={tiny: true, lam: 0.5}",
                   f"validation.references={refs}"))
    rewards = [e["eval/reward"] for e in res.eval_history if "eval/reward" in e]
    assert len(rewards) == 2 and res.recipe.validator.best_step in (0, 2)
    assert (tmp_path / "best" / "README.md").exists()
