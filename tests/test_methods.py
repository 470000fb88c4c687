"""The Diffusion-DPO method family: each method's distinguishing computation, plus tiny end-to-end runs."""
import math
from types import SimpleNamespace

import pytest
import torch

from mmalign.config import ConfigError, load_config
from mmalign.demo.world import synthetic_pairs
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
    gens = [r._generator(0, int(i), "train") for i in b.index]
    _, _, _, cond = r._inputs(b, gens, "train")
    enc = lambda caps: r.encode_text(caps)[0]  # noqa: E731
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
