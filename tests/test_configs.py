"""Every shipped config loads and binds (recursively, litgpt-style); binding errors are clear."""
from pathlib import Path

import pytest
import yaml

from mmalign.config import ConfigError
from mmalign.train.sections import load_config
from mmalign.train.sections import RECIPES

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml"))
RECIPE_CONFIGS = [p for p in CONFIGS if "accelerate" not in p.parts]
ACCEL_CONFIGS = [p for p in CONFIGS if "accelerate" in p.parts]


def test_configs_are_found():
    assert len(RECIPE_CONFIGS) >= 5 and len(ACCEL_CONFIGS) >= 3


@pytest.mark.parametrize("path", RECIPE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_config_binds(path):
    cfg = load_config(path)
    assert isinstance(cfg, RECIPES[cfg.recipe])
    cfg.loss.validate()


@pytest.mark.parametrize("path", ACCEL_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_accelerate_config_parses(path):
    data = yaml.safe_load(path.read_text())
    assert data["distributed_type"] in {"MULTI_GPU", "FSDP", "DEEPSPEED", "MULTI_CPU", "NO"}
    assert data["num_processes"] >= 1


def test_inheritance_and_overrides():
    cfg = load_config(ROOT / "configs/tiny/lm_kto.yaml", ["train.lr=3e-4", "loss.beta=0.2"])
    assert cfg.loss.name == "kto" and cfg.loss.params["beta"] == 0.2
    assert cfg.train.lr == 3e-4
    assert cfg.model.tiny["n_layer"] == 2  # inherited from lm_dpo.yaml


@pytest.mark.parametrize("override,match", [
    ("train.lrr=1", r"unknown key\(s\) \['lrr'\]"),
    ("train.batch_size=abc", r"train.batch_size: expected an integer"),
    ("train.optimizer=adam", r"'adam' is not one of"),
    ("loss.name=dop", r"unknown loss 'dop'; known names: .*dpo"),
    ("loss.gamma=2", r"loss 'dpo' has no hyper-parameter\(s\) \['gamma'\]"),
    ("loss.beta=abc", r"loss.beta: expected float"),
    ("recipe=nope", r"unknown recipe 'nope'"),
    ("train.max_steps=0", r"max_steps must be >= 1"),
    ("model.name_or_path=gpt2", r"exactly one of name_or_path or tiny"),
])
def test_bad_config_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT / "configs/tiny/lm_dpo.yaml", [override])


def test_missing_required_key(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("recipe: lm\nmodel: {tiny: {arch: gpt2}}\n")
    with pytest.raises(ConfigError, match="set data.train"):
        load_config(f)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_one_shared_model_source_section(recipe):
    """Every recipe's model section is the shared ModelSource (exactly one of name_or_path / tiny); those
    with a reference are PolicySource, so 'peft needs lora' holds for all of them (VLM once lost it)."""
    import dataclasses
    import typing

    from mmalign.train.sections import ModelSource, PolicySource

    cls = RECIPES[recipe]
    model_t = typing.get_type_hints(cls)["model"]
    assert issubclass(model_t, ModelSource)
    with pytest.raises(ConfigError, match="exactly one of name_or_path or tiny"):
        model_t(name_or_path="x", tiny={}).validate()
    if "reference" in {f.name for f in dataclasses.fields(model_t)}:
        assert issubclass(model_t, PolicySource)
        with pytest.raises(ConfigError, match="peft needs model.lora"):
            model_t(tiny={}, reference="peft").validate()


def test_yaml_no_is_read_as_the_choice_no():
    """YAML 1.1 reads `no` as False; a Literal field that offers "no" takes it as "no" (mixed_precision=no)."""
    from mmalign.train.sections import load_config

    cfg = load_config("configs/tiny/diffusion_dpo.yaml", ["train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"


def test_every_config_field_has_a_docstring():
    """The config reference (``--show``, the docs page) is generated from these: an undocumented field fails here."""
    from mmalign.config_doc import rows
    from mmalign.train.sections import RECIPES

    missing = [f"{name}: {r['key']}" for name, cls in RECIPES.items() for r in rows(cls) if not r["doc"]]
    assert not missing, missing


def test_train_show_prints_every_field_with_value_default_and_doc(capsys, tmp_path):
    from mmalign.cli import main
    from mmalign.config_doc import rows
    from mmalign.train.sections import load_config

    assert main(["train", "configs/tiny/diffusion_dpo.yaml", "--show", "train.lr=0.5",
                 f"train.output_dir={tmp_path / 'run'}"]) == 0
    out = capsys.readouterr().out
    cfg = load_config("configs/tiny/diffusion_dpo.yaml")
    for r in rows(type(cfg), cfg):
        name = r["key"].rsplit(".", 1)[-1]
        assert f"{name}:" in out, r["key"]
    assert "*lr: 0.5  [float; default 1e-05]" in out and "learning rate (before scale_lr)" in out
    assert not (tmp_path / "run").exists()  # --show trains (and writes) nothing
