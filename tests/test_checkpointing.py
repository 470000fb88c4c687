"""``model.gradient_checkpointing: auto`` (mmalign.models.checkpointing): the fake forward counts what the real one
saves, the decision follows the device's free memory, and the step computes the same numbers either way."""
import pytest
import torch

from mmalign.config import ConfigError
from mmalign.models import checkpointing as ck
from accelerate import Accelerator

from mmalign.train.diffusion import DiffusionRecipe
from mmalign.train.loop import train
from mmalign.train.sections import load_config
from tests.test_diffusion import batch_of, recipe_

CONFIGS = {"sd": ("diffusion_dpo", []), "sdxl": ("diffusion_dpo", ["model.kind=sdxl"]), "sd3": ("flow_dpo", []),
           "flux": ("flux_dpo", [])}


def real_saved_bytes(module, args, kwargs) -> int:
    """What autograd saves in a real forward, counted as ``fake_forward`` counts on fakes."""
    existing = {t.untyped_storage()._cdata for t in [*module.parameters(), *module.buffers(), *args,
                                                    *[v for v in kwargs.values() if torch.is_tensor(v)]]}
    for v in kwargs.values():
        if isinstance(v, dict):
            existing |= {t.untyped_storage()._cdata for t in v.values() if torch.is_tensor(t)}
    seen, total = set(existing), [0]

    def pack(x):
        key = x.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            total[0] += x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        module(*args, **kwargs)
    return total[0]


def auto_recipe(tmp_path, monkeypatch, free, *ov, kind="sd"):
    """A tiny LoRA recipe with checkpointing auto and ``free`` bytes of memory left; the fake count's inputs and
    result are recorded."""
    calls = []

    def count(module, args, kwargs):
        n, outs = real_count(module, args, kwargs)
        calls.append((module, args, kwargs, n))
        return n, outs

    real_count = ck.fake_forward
    monkeypatch.setattr(ck, "fake_forward", count)
    monkeypatch.setattr(ck, "available_bytes", lambda device: free)
    name, kind_ov = CONFIGS[kind]
    torch.manual_seed(0)
    cfg = load_config(f"configs/tiny/{name}.yaml", [f"train.output_dir={tmp_path}", "train.progress=false",
                                                     "validation.prompts=[]", "model.gradient_checkpointing=auto",
                                                     *kind_ov, *ov])
    return DiffusionRecipe(cfg, Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=True)), calls


@pytest.mark.parametrize("kind", ["sd", "sdxl", "sd3", "flux"])
def test_fake_count_is_what_the_real_forward_saves(tmp_path, monkeypatch, kind):
    """For every family: the bytes counted on fake tensors at the first trained forward equal the bytes a real
    forward with the same inputs saves (without checkpointing), and are more than checkpointing saves."""
    r, calls = auto_recipe(tmp_path, monkeypatch, 2**40, kind=kind)
    r.compute(batch_of(r), step=0).loss.mean().backward()
    (module, args, kwargs, fake), = calls
    assert module is r.unet and fake > 0
    assert r.unet._mmalign_checkpointing["on"] is False and not r.unet.is_gradient_checkpointing
    assert real_saved_bytes(module, args, kwargs) == fake
    r.unet.enable_gradient_checkpointing()
    assert real_saved_bytes(module, args, kwargs) < fake


def test_bf16_mixed_precision_counts_what_autocast_saves(tmp_path, monkeypatch):
    """The GPU recipe (bf16 frozen weights, fp32 LoRA, autocast from accelerate's prepared forward -- which runs
    after the deciding pre-hook): the fake forward goes through the same autocast, so it counts what the real
    bf16 forward saves, not an fp32 forward (which would fail on the bf16 weights)."""
    r, calls = auto_recipe(tmp_path, monkeypatch, 2**40, "train.mixed_precision=bf16", "train.max_steps=1",
                           "train.eval_every=0")
    train(r, r.cfg.train, r.acc)
    (module, args, kwargs, fake), = calls
    assert module._mmalign_checkpointing["error"] is None and not module.is_gradient_checkpointing
    assert real_saved_bytes(module, args, kwargs) == fake
    from accelerate.state import AcceleratorState  # a second Accelerator of another precision in this test

    AcceleratorState._reset_state(True)
    fp32, _ = auto_recipe(tmp_path / "fp32", monkeypatch, 2**40)
    fp32.compute(batch_of(fp32), step=0).loss.mean().backward()
    assert fp32.unet._mmalign_checkpointing["activations_mb"] > module._mmalign_checkpointing["activations_mb"]


@pytest.mark.parametrize("free,on", [(2**40, False), (10**5, True), (None, True)], ids=["fits", "tight", "unknown"])
def test_auto_follows_free_memory_and_computes_the_same_step(tmp_path, monkeypatch, free, on):
    """Checkpointing stays on where the step would not fit (or free memory is unknown) and goes off where it
    fits; loss and LoRA gradients are those of the explicit setting, to the bit. Forwards under no_grad (the
    reference) leave the decision to the first trained forward."""
    r, calls = auto_recipe(tmp_path / "auto", monkeypatch, free)
    assert r.unet.is_gradient_checkpointing and len(r.unet._forward_pre_hooks) == 1  # on until decided
    with torch.no_grad():  # every forward of the step under no_grad: nothing decided
        r.compute(batch_of(r), step=0)
    assert not calls and len(r.unet._forward_pre_hooks) == 1
    out = r.compute(batch_of(r), step=0)
    out.loss.mean().backward()
    assert len(calls) == 1 and len(r.unet._forward_pre_hooks) == 0
    assert r.unet.is_gradient_checkpointing is on and r.unet._mmalign_checkpointing["on"] is on
    explicit = recipe_(tmp_path / "explicit", f"model.gradient_checkpointing={str(on).lower()}")
    ref = explicit.compute(batch_of(explicit), step=0)
    ref.loss.mean().backward()
    assert torch.equal(out.loss, ref.loss)
    grads = [(p.grad, q.grad) for p, q in zip(r.unet.parameters(), explicit.unet.parameters()) if p.requires_grad]
    assert grads and all(torch.equal(a, b) for a, b in grads)
    r.compute(batch_of(r), step=1)
    assert len(calls) == 1  # decided once


def test_rule_counts_activations_and_optimizer_states():
    assert not ck.checkpointing_needed(activations=100, trainable=10, available=1000)  # 155 <= 800
    assert not ck.checkpointing_needed(activations=600, trainable=10, available=1000)  # 780 <= 800
    assert ck.checkpointing_needed(activations=640, trainable=10, available=1000)  # 830 > 800
    assert ck.checkpointing_needed(activations=100, trainable=250, available=1000)  # 125 + 750 > 800
    assert ck.checkpointing_needed(activations=1, trainable=0, available=None)
    assert ck.checkpointing_needed(activations=100, trainable=10, available=1000, outputs=250)  # + 750 > 800


def test_a_failed_fake_forward_keeps_checkpointing_on(tmp_path, monkeypatch, capsys):
    def broken(module, args, kwargs):
        raise RuntimeError("an op fake tensors do not support")

    monkeypatch.setattr(ck, "fake_forward", broken)
    monkeypatch.setattr(ck, "available_bytes", lambda device: 2**40)
    r = recipe_(tmp_path, "model.gradient_checkpointing=auto")
    r.compute(batch_of(r), step=0).loss.mean().backward()
    assert r.unet.is_gradient_checkpointing and "op fake tensors do not support" in r.unet._mmalign_checkpointing[
        "error"]
    assert "gradient_checkpointing auto: on (the fake forward failed (RuntimeError" in capsys.readouterr().out


def test_cpu_free_memory_is_read_and_shared_by_the_node(monkeypatch):
    one = ck.available_bytes(torch.device("cpu"))
    assert one is not None and one > 2**20
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert ck.available_bytes(torch.device("cpu")) == pytest.approx(one / 4, rel=0.2)
    assert ck.available_bytes(torch.device("meta")) is None


def test_auto_is_on_under_compile_and_a_clear_error_elsewhere(tmp_path, monkeypatch):
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda m, **k: real(m, backend="eager"))
    r = recipe_(tmp_path, "model.gradient_checkpointing=auto", "model.compile=true")
    assert r.unet.is_gradient_checkpointing and len(r.unet._forward_pre_hooks) == 0
    with pytest.raises(ConfigError, match="sometimes"):
        load_config("configs/tiny/diffusion_dpo.yaml", ["model.gradient_checkpointing=sometimes"])


def test_the_decision_is_kept_in_the_run_summary(tmp_path):
    """What auto chose, and from which figures, is in ``final/summary.json`` beside the run's results."""
    import json

    from mmalign.train.diffusion import run

    cfg = load_config("configs/tiny/diffusion_dpo.yaml", [f"train.output_dir={tmp_path}", "train.progress=false",
                                                           "validation.prompts=[]", "model.gradient_checkpointing=auto",
                                                           "train.max_steps=1", "train.eval_every=0"])
    run(cfg)
    got = json.loads((tmp_path / "final" / "summary.json").read_text())["gradient_checkpointing"]
    assert got["on"] is False and got["activations_mb"] > 0 and got["available_mb"] > 0 and got["error"] is None


def lm_recipe(tmp_path, config, setting):
    from mmalign.train.lm import LMRecipe
    from mmalign.train.vlm import VLMRecipe

    torch.manual_seed(0)
    cfg = load_config(f"configs/tiny/{config}.yaml", [f"train.output_dir={tmp_path}", "train.progress=false",
                                                       f"model.gradient_checkpointing={setting}"])
    return (VLMRecipe if config.startswith("vlm") else LMRecipe)(cfg, Accelerator(cpu=True))


def checkpointed(model) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


@pytest.mark.parametrize("config,on", [("lm_dpo", False), ("lm_dpo_lora", False), ("vlm_dpo", True)])
def test_language_models_decide_the_same_way(tmp_path, monkeypatch, config, on):
    """Causal LMs (full and LoRA, peft-wrapped): on until the first trained forward, whose fake count equals the
    real forward's saved bytes and whose logits are counted as outputs; then off where it fits, with the explicit
    setting's loss and gradients. A LLaVA-style VLM merges its image features where the image tokens are -- a
    data-dependent step fake tensors cannot take -- so auto stays on there, saying why."""
    calls = []
    real_count = ck.fake_forward
    monkeypatch.setattr(ck, "fake_forward", lambda m, a, k: calls.append((m, a, k)) or real_count(m, a, k))
    monkeypatch.setattr(ck, "available_bytes", lambda device: 2**40)
    runs = {}
    for setting in ("auto", str(on).lower()):
        r = lm_recipe(tmp_path / setting, config, setting)
        assert checkpointed(r.policy) is (setting != "false")
        r.model.train()
        out = r.compute(r.train_data.collate([r.train_data[i] for i in range(4)]))
        out.loss.mean().backward()
        runs[setting] = (out.loss.detach(), [p.grad for p in r.policy.parameters() if p.requires_grad], r.policy)
    (module, args, kwargs), = calls
    decided = module._mmalign_checkpointing
    assert decided["on"] is on and checkpointed(runs["auto"][2]) is on
    if on:
        assert "DataDependent" in decided["error"]
    else:
        assert decided["error"] is None
        fake, outputs = real_count(module, args, kwargs)
        assert real_saved_bytes(module, args, kwargs) == fake and outputs > 0
    auto, explicit = runs["auto"], runs[str(on).lower()]
    assert torch.equal(auto[0], explicit[0]) and all(torch.equal(a, b) for a, b in zip(auto[1], explicit[1]))


def test_auto_names_the_storage_lever_where_it_stays_on(tmp_path, monkeypatch, capsys):
    """Where checkpointing stays on for memory, the report names the next lower model.storage_dtype and the bytes
    it would free (half the storable frozen weights), and says whether that would let it go off -- by the same
    rule; a run that stores its weights low already gets no lever."""
    probe, calls = auto_recipe(tmp_path / "probe", monkeypatch, 2**40)
    probe.compute(batch_of(probe), step=0)  # decides: off, so the count below is of the forward without it
    acts, outs = ck.fake_forward(*calls[0][:3])
    trainable = sum(p.numel() * 4 for p in probe.unet.parameters() if p.requires_grad)
    setting, frees = probe._storage_lever(probe.unet)
    frozen = [m.weight for m in probe.unet.modules() if type(m) in (torch.nn.Linear, torch.nn.Conv2d)
              and not m.weight.requires_grad]
    assert setting == "model.storage_dtype=bfloat16" and frees == sum(w.numel() * 4 for w in frozen) // 2 > 0
    need = ck.ACTIVATION_FACTOR * acts + ck.OUTPUT_FACTOR * outs + ck.STATE_FACTOR * trainable
    for free in (int(need / ck.BUDGET_FRACTION) - frees // 2, 1):
        r, _ = auto_recipe(tmp_path / str(free), monkeypatch, free)
        capsys.readouterr()
        r.compute(batch_of(r), step=0)
        record = r.unet._mmalign_checkpointing
        enough = not ck.checkpointing_needed(acts, trainable, free + frees, outs)
        assert record["on"] is True and record["lever"] == {"setting": setting, "frees_mb": round(frees / 2**20),
                                                            "enough": enough}
        assert enough or free == 1  # the first free is short by half of what the lever frees
        said = capsys.readouterr().out
        assert f"model.storage_dtype=bfloat16 would free {round(frees / 2**20)} MB" in said
        assert ("enough to turn it off" in said) is enough
    stored, _ = auto_recipe(tmp_path / "stored", monkeypatch, 1, "model.storage_dtype=bfloat16")
    assert stored._storage_lever(stored.unet) is None
