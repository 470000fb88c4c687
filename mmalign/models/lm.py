"""Text-LM modality adapter: a causal LM and a batch -> per-sample scores for the loss core.

score(y | x) = sum over completion tokens of log p(token), computed from fp32 log-softmax with the
prompt and padding masked (the design's definition, and TRL's). Sequences are right-padded;
position t of the shifted tensors scores ``input_ids[:, t + 1]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mmalign.models.checkpointing import auto_checkpointing
from mmalign.models.lora import fuse_lora_layers
from mmalign.paths import TINY_TOKENIZER, resolve

Tensor = torch.Tensor


def selective_log_softmax(logits: Tensor, index: Tensor, chunk: int = 8) -> Tensor:
    """log_softmax(logits)[..., index] in fp32 without materialising the full fp32 log-prob tensor
    for the whole batch at once (rows are processed ``chunk`` at a time)."""
    out = []
    for lg, ix in zip(logits.split(chunk), index.split(chunk)):
        lg = lg.float()
        out.append(lg.gather(-1, ix.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg, dim=-1))
    return torch.cat(out)


@dataclass
class TokenLogps:
    """Per-token completion log-probs ``[N, T-1]`` (0 outside the mask) and the shifted completion mask."""

    logps: Tensor
    mask: Tensor
    hidden: Tensor | None = None
    logits: Tensor | None = None

    def sum(self) -> Tensor:
        return self.logps.sum(-1)

    def lengths(self) -> Tensor:
        return self.mask.sum(-1).to(self.logps.dtype)

    def mean(self) -> Tensor:
        return self.sum() / self.lengths().clamp(min=1)


def completion_logps(model, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor,
                     hidden: bool = False, keep_logits: bool = False, **model_kwargs) -> TokenLogps:
    """Run ``model`` once and return completion-token log-probs (fp32)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                output_hidden_states=hidden, **model_kwargs)
    logits = out.logits[:, :-1]
    target = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(torch.float32)
    lp = selective_log_softmax(logits, target) * mask
    h = out.hidden_states[-1][:, :-1] if hidden else None
    return TokenLogps(lp, mask, h, logits if keep_logits else None)


# ------------------------------------------------------------------ building models


def load_tokenizer(name_or_path: str | None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve(name_or_path) if name_or_path else str(TINY_TOKENIZER))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def build_causal_lm(section, tokenizer=None):
    """``section``: ``LMModelSection``. Loads ``name_or_path`` with ``from_pretrained`` (hub id or
    local dir) or builds ``tiny`` from a config. Returns (model, tokenizer)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tokenizer or load_tokenizer(section.tokenizer or section.name_or_path)
    dtype = getattr(torch, section.dtype)
    if section.name_or_path is not None:
        model = AutoModelForCausalLM.from_pretrained(resolve(section.name_or_path), dtype=dtype)
    else:
        spec = dict(section.tiny)
        arch = spec.pop("arch", "gpt2")
        spec.setdefault("vocab_size", len(tok))
        if arch == "gpt2":
            spec.setdefault("bos_token_id", tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
            spec.setdefault("eos_token_id", tok.eos_token_id)
            spec.setdefault("n_positions", 512)
        cfg = AutoConfig.for_model(arch, **spec)
        model = AutoModelForCausalLM.from_config(cfg).to(dtype)
    if section.dropout is not None:
        set_dropout(model, section.dropout)
    if section.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if section.lora is not None:
        model = add_lora(model, section.lora)
    return model, tok


def enable_gradient_checkpointing(model):
    """Activation checkpointing of every decoder layer (recomputed in backward); no KV cache in training."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x's name
    (enable or model.gradient_checkpointing_enable)()
    model.config.use_cache = False


def disable_gradient_checkpointing(model):
    disable = getattr(model, "activation_checkpointing_disable", None)  # transformers >= 5.2x's name
    (disable or model.gradient_checkpointing_disable)()


def decide_gradient_checkpointing(model, report=print):
    """``model.gradient_checkpointing: auto`` for a causal LM or VLM (peft-wrapped or not): on until its first
    trained forward decides (mmalign.models.checkpointing; the logits' log-softmax outside the forward is counted
    from the outputs)."""
    auto_checkpointing(model, lambda: enable_gradient_checkpointing(model),
                       lambda: disable_gradient_checkpointing(model), report)


def set_dropout(model, p: float):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p


def add_lora(model, lora):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=lora.target_modules or "all-linear",
                     init_lora_weights="gaussian" if lora.init == "gaussian" else True, task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    fuse_lora_layers(model)  # the same bits as peft's forward, fewer dispatched ops per layer
    return model


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], k: int, max_new_tokens: int = 16,
                       temperature: float = 1.0, seed: int = 0, max_prompt_length: int | None = None) -> list[list[str]]:
    """``k`` sampled completions per prompt from a causal LM (prompt i seeded with ``seed + i``), decoded
    without special tokens and cut at the first newline-free EOS."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = []
    for i, p in enumerate(prompts):
        ids = tokenizer(p, add_special_tokens=False, return_tensors="pt").input_ids
        if max_prompt_length:
            ids = ids[:, -max_prompt_length:]
        ids = ids.to(dev)
        torch.manual_seed(seed + i)
        g = model.generate(input_ids=ids.expand(k, -1), attention_mask=torch.ones_like(ids).expand(k, -1),
                           do_sample=True, temperature=temperature, top_k=None, top_p=None,
                           max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id)
        out.append([tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in g])
    model.train(was)
    return out
