"""VLMs: loaded with transformers (hub id / folder) or built tiny from configs.

``LlavaForConditionalGeneration`` + its processor (which expands ``<image>`` into the image tokens), and
``PaliGemmaForConditionalGeneration`` (SigLIP + Gemma, a prefix-LM: the image + prompt attend
bidirectionally, marked by ``token_type_ids`` 0, the answer causally, 1). Other families with an
``AutoModelForImageTextToText`` class and a processor load the same way.
"""
from __future__ import annotations

import torch

from mmalign.paths import ASSETS, resolve

IMAGE_TOKEN = "<image>"


def load_vlm(name_or_path: str, dtype=torch.float32):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = resolve(name_or_path)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    proc = AutoProcessor.from_pretrained(path)
    if proc.tokenizer.pad_token is None:
        proc.tokenizer.pad_token = proc.tokenizer.eos_token
    return model, proc


def tiny_llava(seed: int = 0, hidden: int = 64, layers: int = 2, vision_layers: int = 2, patch_size: int = 8):
    """A LLaVA at test size: CLIP ViT (32 px, patch 8 -> 16 image tokens; patch 4 -> 64) + Llama decoder over the tiny BPE
    vocabulary with an added ``<image>`` token. Returns (model, processor)."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizers" / "tiny-bpe"))
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tok.model_max_length = 128
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch_size, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=patch_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                       num_hidden_layers=vision_layers, num_attention_heads=4),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_select_strategy="default",
        vision_feature_layer=-1, projector_hidden_act="gelu")
    return LlavaForConditionalGeneration(cfg), proc


def tiny_paligemma(seed: int = 0, hidden: int = 64, layers: int = 2, vision_layers: int = 2, patch_size: int = 8):
    """A PaliGemma at test size: SigLIP ViT (32 px) + Gemma decoder over the tiny BPE vocabulary."""
    from transformers import (
        AutoTokenizer,
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
        SiglipVisionConfig,
    )

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizers" / "tiny-bpe"))
    tok.model_max_length = 128
    ip = SiglipImageProcessor(size={"height": 32, "width": 32})
    ip.image_seq_length = (32 // patch_size) ** 2
    proc = PaliGemmaProcessor(image_processor=ip, tokenizer=tok)  # adds the <image> token
    tok = proc.tokenizer
    cfg = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(image_size=32, patch_size=patch_size, hidden_size=hidden,
                                         intermediate_size=2 * hidden, num_hidden_layers=vision_layers,
                                         num_attention_heads=4),
        text_config=GemmaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                head_dim=hidden // 4, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN), projection_dim=hidden)
    return PaliGemmaForConditionalGeneration(cfg), proc


TINY = {"llava": tiny_llava, "paligemma": tiny_paligemma}


def tiny_vlm(family: str = "llava", **kw):
    if family not in TINY:
        raise KeyError(f"unknown tiny VLM family {family!r}; known: {sorted(TINY)}")
    return TINY[family](**kw)


def is_prefix_lm(processor) -> bool:
    """PaliGemma-style processors mark the prefix with token_type_ids (0 = prefix, attended bidirectionally)."""
    return "token_type_ids" in getattr(processor, "model_input_names", ())


def image_token_id(processor) -> int:
    return processor.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", IMAGE_TOKEN))


def encode_prompt(processor, prompt: str, image):
    """(prompt token ids with the image tokens expanded, pixel_values [3, H, W])."""
    sep = "" if is_prefix_lm(processor) else "\n"  # PaliGemma: <image>... <bos> prompt "\n" (its own layout)
    text = prompt if IMAGE_TOKEN in prompt else f"{IMAGE_TOKEN}{sep}{prompt}"
    enc = processor(images=[image], text=[text], return_tensors="pt")
    return enc["input_ids"][0].tolist(), enc["pixel_values"][0]


@torch.no_grad()
def generate(model, processor, prompts: list[str], images, max_new_tokens: int = 24, do_sample: bool = False,
             temperature: float = 1.0, attention_mask_fn=None, generator_seed: int | None = None) -> list[str]:
    """Answers for (prompt, image) pairs; ``attention_mask_fn(input_ids, attention_mask)`` may hide image
    tokens (BDHS). Decoded text after the prompt, special tokens removed."""
    tok = processor.tokenizer
    out = []
    for p, im in zip(prompts, images):
        ids, pix = encode_prompt(processor, p, im)
        ids_t = torch.tensor([ids], device=model.device)
        mask = torch.ones_like(ids_t)
        if attention_mask_fn is not None:
            mask = attention_mask_fn(ids_t, mask)
        extra = {"token_type_ids": torch.zeros_like(ids_t)} if is_prefix_lm(processor) else {}
        if generator_seed is not None:
            torch.manual_seed(generator_seed + len(out))
        g = model.generate(input_ids=ids_t, attention_mask=mask, pixel_values=pix[None].to(model.device), **extra,
                           max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature if do_sample else None,
                           top_p=None, top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out.append(tok.decode(g[0, ids_t.shape[1]:], skip_special_tokens=True).strip())
    return out
