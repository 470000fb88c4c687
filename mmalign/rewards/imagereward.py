"""ImageReward (Xu et al. 2023, arXiv 2304.05977), the reward most Diffusion-DPO-family papers report.

Network (the ``image-reward`` package's ``ImageReward``): a BLIP ViT-L/16 image encoder; a BERT text encoder
that cross-attends to the image tokens in every layer; the [CLS] state through an MLP
768 -> 1024 -> 128 -> 64 -> 16 -> 1 (no activations, as released); the score normalised as
(r - 0.16717362830052426) / 1.0333394966054072. Preprocessing: resize the short side to 224 (bicubic),
centre crop 224, CLIP mean / std; prompts tokenised by BERT (uncased) padded to 35 tokens.

Built here from the transformers ports of the same BLIP towers (``BlipVisionModel``, ``BlipTextModel``,
whose parameter names are BLIP's own) and loads the released checkpoint (``THUDM/ImageReward``:
``ImageReward.pt`` + ``med_config.json``) by renaming keys (``convert_official_state``). The official
package itself does not run on transformers 5 (its BERT imports helpers that moved); tests/test_fidelity.py
runs its code path with a small compatibility shim and checks equal scores on the same random weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from torchvision import transforms
from transformers import AutoTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from mmalign.paths import ASSETS, resolve

from .models import REWARDS, Reward

Tensor = torch.Tensor
MEAN, STD = 0.16717362830052426, 1.0333394966054072
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
MAX_LENGTH = 35


def reward_mlp(width: int) -> nn.Sequential:
    """The released head, layer for layer (dropouts are identity at inference)."""
    return nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


class ImageRewardModel(nn.Module):
    def __init__(self, vision: BlipVisionConfig, text: BlipTextConfig):
        super().__init__()
        self.vision = BlipVisionModel(vision)
        self.text = BlipTextModel(text, add_pooling_layer=False)
        self.mlp = reward_mlp(text.hidden_size)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        img = self.vision(pixel_values=pixel_values).last_hidden_state
        img_mask = torch.ones(img.shape[:-1], dtype=torch.long, device=img.device)
        txt = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=img,
                        encoder_attention_mask=img_mask).last_hidden_state[:, 0]
        return ((self.mlp(txt.float()) - MEAN) / STD).squeeze(-1)


def vision_config(width=1024, layers=24, heads=16, image_size=224, patch_size=16, mlp_ratio=4) -> BlipVisionConfig:
    """BLIP's ViT (``create_vit``): ViT-L/16 at 224 px for ImageReward; LayerNorm eps 1e-6 as in BLIP."""
    return BlipVisionConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=width * mlp_ratio, image_size=image_size, patch_size=patch_size,
                            layer_norm_eps=1e-6, hidden_act="gelu", attention_dropout=0.0)


def text_config(med: dict, encoder_width: int) -> BlipTextConfig:
    """BLIP's ``med_config.json`` (a BERT config with cross-attention) as a BlipTextConfig."""
    return BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=med["hidden_size"],
                          num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
                          intermediate_size=med["intermediate_size"], hidden_act=med.get("hidden_act", "gelu"),
                          max_position_embeddings=med["max_position_embeddings"],
                          layer_norm_eps=med.get("layer_norm_eps", 1e-12), encoder_hidden_size=encoder_width,
                          pad_token_id=med.get("pad_token_id", 0), hidden_dropout_prob=0.0,
                          attention_probs_dropout_prob=0.0, is_decoder=True, bos_token_id=None, sep_token_id=None)


BLOCK_KEYS = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
              "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}


def _vision_key(k: str) -> str:
    """BLIP's ViT (timm-style names) -> BlipVisionModel's names."""
    if k == "cls_token":
        return "embeddings.class_embedding"
    if k == "pos_embed":
        return "embeddings.position_embedding"
    if k.startswith("patch_embed.proj."):
        return "embeddings.patch_embedding." + k.rsplit(".", 1)[1]
    if k.startswith("norm."):
        return "post_layernorm." + k.rsplit(".", 1)[1]
    if k.startswith("blocks."):
        _, i, rest = k.split(".", 2)
        mod, leaf = rest.rsplit(".", 1)
        return f"encoder.layers.{i}.{BLOCK_KEYS[mod]}.{leaf}"
    raise KeyError(f"unexpected BLIP vision key {k!r}")


def convert_official_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``ImageReward.pt`` keys (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``mlp.layers.*``) -> ours;
    the contrastive projections of BLIP pre-training (unused by the reward) are dropped."""
    out = {}
    for k, v in state.items():
        if k.startswith("blip.visual_encoder."):
            out["vision." + _vision_key(k.removeprefix("blip.visual_encoder."))] = v
        elif k.startswith("blip.text_encoder.") and not k.endswith("position_ids"):
            out["text." + k.removeprefix("blip.text_encoder.")] = v
        elif k.startswith("mlp.layers."):
            out["mlp." + k.removeprefix("mlp.layers.")] = v
    return out


def preprocess(size: int = 224):
    return transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                               transforms.CenterCrop(size), transforms.ToTensor(),
                               transforms.Normalize(CLIP_MEAN, CLIP_STD)])


class _Backbone(nn.Module):
    """Model + tokenizer + preprocessing, movable like the other reward backbones."""

    def __init__(self, model: ImageRewardModel, tokenizer, size: int = 224):
        super().__init__()
        self.model, self.tokenizer, self.transform = model.eval(), tokenizer, preprocess(size)

    def forward(self, images, prompts):
        dev = next(self.model.parameters()).device
        pix = torch.stack([self.transform(im.convert("RGB")) for im in images]).to(dev)
        tok = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH,
                             return_tensors="pt").to(dev)
        return self.model(pix, tok.input_ids, tok.attention_mask)


@REWARDS.register("imagereward")
class ImageReward(Reward):
    """ImageReward (Xu et al. 2023, arXiv 2304.05977): BLIP image-text cross-encoder + MLP, trained on 137k
    expert comparisons (see the module docstring). ``THUDM/ImageReward`` (Apache-2.0)."""

    needs_prompts = True
    default_model = "THUDM/ImageReward"
    weights = "THUDM/ImageReward: ImageReward.pt + med_config.json (Apache-2.0); tokenizer bert-base-uncased"

    @classmethod
    def load(cls, model=None, device=None, tokenizer: str = "bert-base-uncased", **kw):
        path = Path(resolve(model or cls.default_model))
        if path.is_dir():
            ckpt, med = path / "ImageReward.pt", path / "med_config.json"
        else:
            from huggingface_hub import hf_hub_download

            ckpt = Path(hf_hub_download(str(model or cls.default_model), "ImageReward.pt"))
            med = Path(hf_hub_download(str(model or cls.default_model), "med_config.json"))
        net = ImageRewardModel(vision_config(), text_config(json.loads(med.read_text()), 1024))
        missing, unexpected = net.load_state_dict(
            convert_official_state(torch.load(ckpt, map_location="cpu", weights_only=True)), strict=False)
        if missing:
            raise KeyError(f"{ckpt}: {len(missing)} ImageReward weights missing, e.g. {missing[:3]}")
        tok = AutoTokenizer.from_pretrained(resolve(tokenizer))
        return cls(_Backbone(net, tok), device)

    @classmethod
    def tiny(cls, device=None, seed: int = 0, **kw):
        torch.manual_seed(seed)
        tok = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizers" / "tiny-bpe"))
        tok.pad_token = tok.pad_token or "<pad>"
        med = {"vocab_size": len(tok), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
               "intermediate_size": 37, "max_position_embeddings": 64, "pad_token_id": tok.pad_token_id}
        net = ImageRewardModel(vision_config(width=32, layers=2, heads=4), text_config(med, 32))
        return cls(_Backbone(net, tok), device)

    def _score(self, images, prompts, references):
        return self.backbone(images, prompts)
