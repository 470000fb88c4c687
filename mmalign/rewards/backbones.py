"""Image/text encoders behind the rewards: transformers CLIP (and ALIGN), open_clip, and DINO ViTs.

Two preprocessing paths, one result: PIL images go through exactly what the official code does (the
model's own transformers image processor, or torchvision's PIL ``Resize`` / ``CenterCrop`` geometry with
PIL's bicubic filter, or HPSv2's long-side resize + zero pad) -- checked against the official packages in
tests/test_fidelity.py; a float tensor ``[N, 3, H, W]`` in [0, 1] is resized and normalised *as a tensor*
(antialiased bicubic), so rewards stay differentiable for reward-gradient training. Features come back
L2-normalised.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmalign.paths import resolve

Tensor = torch.Tensor
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(images) -> Tensor:
    """list[PIL] (any sizes) -> list of [3, H, W] in [0, 1]; a tensor passes through."""
    if isinstance(images, Tensor):
        return images
    return [torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
            for im in images]


def pil_geometry(im, size: int):
    """torchvision ``Resize(size, BICUBIC)`` (short side to size, long side truncated) + ``CenterCrop(size)``
    (offsets rounded) on a PIL image: the transform of open_clip, ImageReward and DreamBench's DINO."""
    from PIL import Image

    im = im.convert("RGB")
    w, h = im.size
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    im = im.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def is_pil_list(images) -> bool:
    return not isinstance(images, Tensor) and len(images) > 0 and hasattr(images[0], "convert")


def preprocess(images, size: int, mean, std, mode: str = "crop") -> Tensor:
    """``[N, 3, size, size]`` normalised pixels.

    ``crop``: PIL images take ``pil_geometry`` (the official PIL path, exactly); tensors (differentiable)
    resize the short side with antialiased bicubic and centre-crop.
    ``pad`` (HPSv2): resize the long side to ``size`` (rounded) with antialiased bicubic *on the tensor* and
    zero-pad (floor(d/2), d - floor(d/2)) -- the official HPSv2 transform converts to a tensor first, so this
    is its exact path for PIL images and tensors alike."""
    if mode == "crop" and is_pil_list(images):
        images = [pil_geometry(im, size) for im in images]
    xs = to_tensor(images)
    if isinstance(xs, Tensor) and xs.dim() == 4:
        xs = list(xs)
    out = []
    for x in xs:
        h, w = x.shape[-2:]
        if mode == "crop":
            if (h, w) != (size, size):
                s = size / min(h, w)
                nh, nw = max(size, round(h * s)), max(size, round(w * s))
                x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
                top, left = (nh - size) // 2, (nw - size) // 2
                x = x[:, top: top + size, left: left + size].clamp(0, 1)
        elif mode == "pad":
            s = size / max(h, w)
            if s != 1.0:
                nh, nw = round(h * s), round(w * s)
                x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
                ph, pw = size - nh, size - nw
                x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
        else:
            raise ValueError(f"unknown resize mode {mode!r}")
        out.append(x)
    x = torch.stack(out)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _unwrap(out) -> Tensor:
    """transformers v5 returns BaseModelOutputWithPooling from get_*_features; v4 a tensor."""
    if isinstance(out, Tensor):
        return out
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        v = getattr(out, key, None)
        if v is not None:
            return v
    return out[0]


class _Contrastive:
    """What the two CLIP backbones share: the device of their weights and the learned temperature."""

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()


class HFClip(_Contrastive):
    """transformers ``CLIPModel`` / ``AlignModel`` (anything with get_image/text_features)."""

    def __init__(self, model, tokenizer, size: int = 224, mean=OPENAI_MEAN, std=OPENAI_STD, mode="crop",
                 max_length: int = 77, image_processor=None):
        self.model, self.tokenizer, self.image_processor = model.eval(), tokenizer, image_processor
        self.size, self.mean, self.std, self.mode, self.max_length = size, mean, std, mode, max_length

    @classmethod
    def load(cls, name_or_path: str, processor: str | None = None, dtype=torch.float32, **kw):
        from transformers import AutoModel, AutoProcessor

        path = resolve(name_or_path)
        model = AutoModel.from_pretrained(path, dtype=dtype)
        proc = AutoProcessor.from_pretrained(resolve(processor) if processor else path)
        ip = proc.image_processor
        vc = getattr(model.config, "vision_config", None)
        size = getattr(vc, "image_size", None) or 224  # the crop size CLIP's processor uses
        kw.setdefault("mean", tuple(ip.image_mean))
        kw.setdefault("std", tuple(ip.image_std))
        tc = getattr(model.config, "text_config", None)
        kw.setdefault("max_length", min(77, getattr(tc, "max_position_embeddings", 77) or 77))
        return cls(model, proc.tokenizer, size=size, image_processor=ip, **kw)

    def pixels(self, images) -> Tensor:
        """PIL images through the model's own image processor (what PickScore's and torchmetrics' code do);
        tensors through the differentiable path."""
        if self.image_processor is not None and is_pil_list(images):
            return self.image_processor(images=[im.convert("RGB") for im in images], return_tensors="pt").pixel_values
        return preprocess(images, self.size, self.mean, self.std, self.mode)

    def image_features(self, images) -> Tensor:
        x = self.pixels(images).to(self.device, next(self.model.parameters()).dtype)
        return F.normalize(_unwrap(self.model.get_image_features(pixel_values=x)).float(), dim=-1)

    def text_features(self, texts: list[str]) -> Tensor:
        t = self.tokenizer(list(texts), padding="max_length", max_length=self.max_length, truncation=True,
                           return_tensors="pt").to(self.device)
        return F.normalize(_unwrap(self.model.get_text_features(**t)).float(), dim=-1)

    def to(self, device):
        self.model.to(device)
        return self


class OpenClip(_Contrastive):
    """open_clip model: a built-in name + ``pretrained`` file/tag, or ``local-dir:`` / ``hf-hub:`` ids."""

    def __init__(self, model, tokenizer, size: int, mean=OPENAI_MEAN, std=OPENAI_STD, mode: str = "crop"):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.size, self.mean, self.std, self.mode = size, mean, std, mode

    @classmethod
    def load(cls, name: str, pretrained: str | None = None, mode: str | None = None, state_dict_key=None, **kw):
        import open_clip

        if Path(resolve(name)).is_dir():
            name = "local-dir:" + resolve(name)
        elif name.endswith(".json") and Path(resolve(name)).is_file():  # an architecture config file
            cfg = json.loads(Path(resolve(name)).read_text())
            model = open_clip.model.CLIP(**cfg["model_cfg"] if "model_cfg" in cfg else cfg)
            if pretrained:
                load_state(model, resolve(pretrained), state_dict_key)
            tok = open_clip.SimpleTokenizer(context_length=model.context_length)
            return cls._wrap(model, tok, mode, **kw)
        model = open_clip.create_model(name, pretrained=None if state_dict_key else pretrained)
        if state_dict_key and pretrained:
            load_state(model, resolve(pretrained), state_dict_key)
        tok = open_clip.get_tokenizer(name)
        return cls._wrap(model, tok, mode, **kw)

    @classmethod
    def _wrap(cls, model, tok, mode, **kw):
        pc = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = pc.get("size", getattr(model.visual, "image_size", 224))
        size = size[0] if isinstance(size, (tuple, list)) else size
        resize_mode = mode or ("pad" if pc.get("resize_mode") == "longest" else "crop")
        return cls(model, tok, int(size), tuple(pc.get("mean", OPENAI_MEAN)), tuple(pc.get("std", OPENAI_STD)),
                   resize_mode, **kw)

    def image_features(self, images) -> Tensor:
        x = preprocess(images, self.size, self.mean, self.std, self.mode).to(self.device)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    def text_features(self, texts: list[str]) -> Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float(), dim=-1)

    def to(self, device):
        self.model.to(device)
        return self


class DinoViT:
    """DINO ViT (transformers ``ViTModel``), [CLS] of the last layer (DreamBench's DINO metric)."""

    def __init__(self, model, size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.model, self.size, self.mean, self.std = model.eval(), size, mean, std

    @classmethod
    def load(cls, name_or_path: str, **kw):
        from transformers import ViTModel

        model = ViTModel.from_pretrained(resolve(name_or_path), add_pooling_layer=False)
        return cls(model, size=model.config.image_size, **kw)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def image_features(self, images) -> Tensor:
        x = preprocess(images, self.size, self.mean, self.std, "crop").to(self.device)
        return F.normalize(self.model(pixel_values=x).last_hidden_state[:, 0].float(), dim=-1)

    def to(self, device):
        self.model.to(device)
        return self


def load_state(model: torch.nn.Module, path: str, key: str | None = None):
    """Load ``.safetensors`` or a ``.pt``/``.pth`` checkpoint (``weights_only=True``, no code execution);
    ``key`` selects a sub-dict such as HPSv2's ``state_dict``; a ``module.`` prefix is stripped."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if key and key in sd:
        sd = sd[key]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing:
        raise KeyError(f"{path}: checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    return unexpected
