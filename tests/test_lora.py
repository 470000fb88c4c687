"""mmalign.models.lora: peft's LoRA layers with the low-rank term as one autograd function -- the same bits as
peft's forward and backward, fewer dispatched ops, and peft's own forward wherever the fused one does not apply."""
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig
from torch.profiler import profile

from mmalign.models import lora as lora_mod
from mmalign.models.lora import fuse_lora_layers
from tests.test_storage import TARGETS, lora_unet


def unet_step(unet, amp: bool, checkpointing: bool):
    """Loss, the input's gradient and every LoRA gradient of one forward / backward, with the aten ops and
    dtype-cast copies it dispatched."""
    if checkpointing:
        unet.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g, requires_grad=True)
    cond = torch.randn(2, 4, unet.config.cross_attention_dim, generator=g)
    dtype = torch.bfloat16 if amp else torch.float32
    with profile() as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = unet(x.to(dtype) if amp else x, torch.tensor([10, 500]),
                        encoder_hidden_states=cond.to(dtype)).sample.float().square().mean()
        loss.backward()
    ops = {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")}
    grads = {n: p.grad for n, p in unet.named_parameters() if p.requires_grad}
    return [loss.detach(), x.grad, *grads.values()], sum(ops.values()), ops.get("aten::_to_copy", 0)


def bf16_base(unet):
    """The GPU recipe's layout: frozen weights bf16, LoRA weights fp32."""
    unet.to(torch.bfloat16)
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return unet


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_lora_gives_peft_bits_with_fewer_ops(amp, checkpointing):
    """fp32, and a bf16 base with fp32 LoRA under bf16 autocast: the same loss, input gradient and LoRA gradients
    to the bit as peft's layers, and >= 30 fewer aten ops per LoRA layer for a forward + backward (measured on
    torch 2.14: 32 fp32, 48 under autocast, which also drops peft's cast of x to fp32 and back; 42 and 70 with
    checkpointing's second forward)."""
    runs = {}
    for fused in (False, True):
        unet = lora_unet()
        if amp:
            bf16_base(unet)
        n = fuse_lora_layers(unet) if fused else 0
        runs[fused] = (*unet_step(unet, amp, checkpointing), n)
    (ref, ref_ops, ref_copies, _), (got, ops, copies, n) = runs[False], runs[True]
    assert n == 32  # q / k / v / out of the tiny UNet's 8 attentions
    assert len(got) == len(ref) == 2 + 2 * n and all(torch.equal(a, b) for a, b in zip(got, ref))
    assert all(t.abs().sum() > 0 for t in got[2:])  # every LoRA matrix got a gradient (the test can see one)
    assert ops <= ref_ops - 30 * n, (ops, ref_ops)
    if amp:
        assert copies <= ref_copies - 2 * n, (copies, ref_copies)  # peft's x -> fp32 -> bf16, per layer


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
def test_fused_forward_steps_aside_where_it_does_not_apply(monkeypatch):
    """peft's own forward runs (and gives peft's numbers) with adapters disabled (the reference), several active
    adapters, LoRA dropout, and a bf16 input to fp32 LoRA weights outside autocast (peft casts it)."""
    calls = []
    real = lora_mod.LoraDelta.apply
    monkeypatch.setattr(lora_mod.LoraDelta, "apply", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g)
    cond = torch.randn(1, 4, 32, generator=g)

    def out(unet, dtype=torch.float32):
        with torch.no_grad():
            return unet(x.to(dtype), torch.tensor([10]), encoder_hidden_states=cond.to(dtype)).sample

    def pair(setup):
        plain, fused = setup(lora_unet()), setup(lora_unet())
        assert fuse_lora_layers(fused) == 32
        return plain, fused

    plain, fused = pair(lambda u: u)
    assert torch.equal(out(plain), out(fused)) and len(calls) == 32  # the fused path itself, once per layer
    plain.disable_adapters()
    fused.disable_adapters()
    calls.clear()
    assert torch.equal(out(plain), out(fused)) and not calls

    def two(u):
        u.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=TARGETS), "second")
        u.set_adapters(["default_0", "second"])
        return u

    for setup in (two, lambda u: bf16_base(u)):
        plain, fused = pair(setup)
        dtype = torch.bfloat16 if setup is not two else torch.float32
        calls.clear()
        assert torch.equal(out(plain, dtype), out(fused, dtype)) and not calls
    unet = lora_unet()
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, lora_dropout=0.5, target_modules=TARGETS), "dropped")
    unet.set_adapters("dropped")
    fuse_lora_layers(unet)
    calls.clear()
    out(unet)
    assert not calls


def test_lm_lora_is_fused_with_the_same_bits():
    """The LM / VLM wing's ``add_lora`` fuses its layers too: logits and every LoRA gradient as peft's."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmalign.models.lm import add_lora

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2)
    lora = SimpleNamespace(r=4, alpha=8, dropout=0.0, target_modules=None, init="gaussian")
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    res = []
    for ours in (False, True):
        torch.manual_seed(0)
        base = LlamaForCausalLM(cfg)
        if ours:
            model = add_lora(base, lora)
        else:
            model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                    init_lora_weights="gaussian", task_type="CAUSAL_LM"))
        gen = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.02, generator=gen)
        logits = model(ids).logits
        logits.square().mean().backward()
        res.append([logits.detach()] + [p.grad for p in model.parameters() if p.requires_grad])
        fused = sum(1 for m in model.modules() if hasattr(m, "_peft_forward"))
        assert fused == (14 if ours else 0)  # q/k/v/o + gate/up/down, 2 layers
    assert len(res[0]) == len(res[1]) == 1 + 28 and all(torch.equal(a, b) for a, b in zip(*res))
