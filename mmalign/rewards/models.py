"""Bundled image reward models behind one interface.

``reward.score(images, prompts=None, references=None) -> Tensor[N]``: ``images`` is a list of PIL
images or a float tensor ``[N, 3, H, W]`` in [0, 1]; with a tensor and ``differentiable=True`` the
score keeps its graph (CLIP-family rewards), otherwise it runs under ``no_grad`` in batches.
Each class loads real weights from a hub id or local path (``model=``) and has ``tiny()`` -- the
exact architecture family at test size with random weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from mmalign.paths import ASSETS, resolve
from mmalign.registry import Registry

from .backbones import DinoViT, HFClip, OpenClip, load_state

Tensor = torch.Tensor
REWARDS: Registry = Registry("reward")
TOY_CLIP = ASSETS / "models" / "toy-clip"


def lambda_harmonic(s_i2i: Tensor, s_t2i: Tensor, lam: float = 0.5) -> Tensor:
    """RPO's lambda-harmonic reward (Miao et al. 2024, arXiv 2407.12164, Eq. 6):
    R = 1 / (lam / s_i2i + (1 - lam) / s_t2i), similarities already mapped to [0, 1] by (cos + 1) / 2.
    lam = 0.5, s_i2i = 0.8, s_t2i = 0.6 gives 0.6857. lam = 0 is text alignment only (RPO's labels)."""
    return 1.0 / (lam / (s_i2i + 1e-8) + (1.0 - lam) / (s_t2i + 1e-8))


def pil_images(images) -> list:
    """The ``score`` input as a list of PIL images: a ``[N, 3, H, W]`` tensor in [0, 1] is clamped and converted
    (for rewards whose processors take PIL images); a list is returned as is."""
    if isinstance(images, Tensor):
        from torchvision.transforms.functional import to_pil_image

        return [to_pil_image(x.detach().float().clamp(0, 1).cpu()) for x in images]
    return list(images)


def _tiny_hf_clip(projection_dim: int = 32, seed: int = 0) -> HFClip:
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(ASSETS / "tokenizers" / "tiny-clip-bpe"))
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=tok.model_max_length,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                           num_hidden_layers=2),
        projection_dim=projection_dim)
    return HFClip(CLIPModel(cfg), tok, size=32, max_length=tok.model_max_length)


def _tiny_open_clip(seed: int = 0) -> OpenClip:
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=2, width=32, head_width=16, patch_size=8, image_size=32),
                                 text_cfg=CLIPTextCfg(layers=2, width=32, heads=4, context_length=77))
    return OpenClip(model, open_clip.SimpleTokenizer(context_length=77), size=32)


class Reward:
    """Base class: batching, devices, input checks. Subclasses implement ``_score``."""

    needs_prompts = False
    needs_references = False
    differentiable = False
    default_model = ""
    weights = "any checkpoint of the stated architecture"
    backbone_cls = None
    """a backbone class with ``load(name)``: ``load`` is then that backbone of ``model or default_model``"""

    def __init__(self, backbone, device=None):
        self.backbone = backbone
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.backbone.to(self.device)

    @classmethod
    def load(cls, model: str | None = None, device=None, **kw):
        if cls.backbone_cls is None:
            raise NotImplementedError
        return cls(cls.backbone_cls.load(model or cls.default_model), device)

    @classmethod
    def tiny(cls, device=None, **kw):
        raise NotImplementedError

    def _check(self, n: int, prompts, references):
        name = getattr(self, "registry_name", type(self).__name__)
        if self.needs_prompts:
            if prompts is None:
                raise ValueError(f"reward {name!r} needs prompts (one per image)")
            if len(prompts) != n:
                raise ValueError(f"reward {name!r}: {n} images but {len(prompts)} prompts")
        if self.needs_references and not references:
            raise ValueError(f"reward {name!r} needs reference images")

    def score(self, images, prompts=None, references=None, batch_size: int = 32, differentiable: bool = False) -> Tensor:
        n = len(images)
        self._check(n, prompts, references)
        if differentiable:
            if not self.differentiable:
                raise ValueError(f"reward {self.registry_name!r} has no differentiable mode")
            return self._score(images, prompts, references)
        out = []
        with torch.no_grad():
            for lo in range(0, n, batch_size):
                out.append(self._score(images[lo: lo + batch_size], None if prompts is None else prompts[lo: lo + batch_size],
                                       references).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def _ref_features(self, references) -> Tensor:
        """references: a list of PIL images shared by every scored image."""
        return self.backbone.image_features(references)


# ------------------------------------------------------------------ CLIP family


@REWARDS.register("clipscore")
class ClipScore(Reward):
    """CLIPScore (Hessel et al. 2021, arXiv 2104.08718, Eq. 1): CLIP-S = w * max(cos(E_img, E_txt), 0),
    w = 2.5, with the text prefixed "A photo depicts ". Paper backbone: CLIP ViT-B/32
    (``openai/clip-vit-base-patch32``, MIT licence); any transformers CLIP or open_clip model works."""

    needs_prompts = True
    differentiable = True
    default_model = "openai/clip-vit-base-patch32"
    weights = "openai/clip-vit-base-patch32 (MIT); or any CLIP via model= / open_clip:NAME"
    w = 2.5
    prefix = "A photo depicts "

    @classmethod
    def load(cls, model=None, device=None, **kw):
        return cls(_load_clip(model or cls.default_model, **kw), device)

    @classmethod
    def tiny(cls, device=None, **kw):
        return cls(_tiny_hf_clip(), device)

    def _score(self, images, prompts, references):
        img = self.backbone.image_features(images)
        txt = self.backbone.text_features([self.prefix + p for p in prompts])
        return self.w * torch.clamp((img * txt).sum(-1), min=0.0)


@REWARDS.register("clip_t")
class ClipT(ClipScore):
    """DreamBench CLIP-T: cosine between the image and its prompt (no weight, no clamp, no prefix).
    Backbone CLIP ViT-B/32 by default (papers vary: configurable)."""

    def _score(self, images, prompts, references):
        return (self.backbone.image_features(images) * self.backbone.text_features(prompts)).sum(-1)


@REWARDS.register("clip_i")
class ClipI(ClipScore):
    """DreamBench CLIP-I: mean cosine between the image's and the reference (subject) images' CLIP
    embeddings. Backbone CLIP ViT-B/32 by default."""

    needs_prompts = False
    needs_references = True

    def _score(self, images, prompts, references):
        return (self.backbone.image_features(images) @ self._ref_features(references).T).mean(-1)


@REWARDS.register("pickscore")
class PickScore(ClipScore):
    """PickScore v1 (Kirstain et al. 2023, arXiv 2305.01569): CLIP-H/14 fine-tuned on Pick-a-Pic;
    s = exp(logit_scale) * <e_img, e_txt> on normalised embeddings. ``preference_probabilities`` is
    the softmax of s over candidate images for one prompt. Weights ``yuvalkirstain/PickScore_v1``
    (3.9 GB, MIT), processor ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. A CLIP-family reward: prompts,
    differentiable, and the tiny transformers CLIP as ``ClipScore``'s."""

    default_model = "yuvalkirstain/PickScore_v1"
    processor = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    weights = "yuvalkirstain/PickScore_v1 (MIT) + laion/CLIP-ViT-H-14-laion2B-s32B-b79K processor"

    @classmethod
    def load(cls, model=None, device=None, processor=None, **kw):
        path = model or cls.default_model
        proc = processor or (None if Path(resolve(path)).is_dir() else cls.processor)
        return cls(HFClip.load(path, processor=proc), device)

    def _score(self, images, prompts, references):
        img, txt = self.backbone.image_features(images), self.backbone.text_features(prompts)
        return self.backbone.logit_scale * (img * txt).sum(-1)

    def preference_probabilities(self, images, prompt: str) -> Tensor:
        """P(image i is preferred) among candidates for one prompt: softmax of PickScore."""
        s = self.score(images, [prompt] * len(images))
        return torch.softmax(s, dim=0)


@REWARDS.register("hpsv2")
class HPSv2(ClipT):
    """HPS v2 / v2.1 (Wu et al. 2023, arXiv 2306.09341): open_clip ViT-H-14 fine-tuned on HPD v2;
    score = cosine of normalised embeddings; images resized on the long side to 224 and zero-padded
    (no crop). Weights: ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` from ``xswu/HPSv2``
    (Apache-2.0, ~2 GB; full state dict under ``state_dict``) -- pass the file as ``model=``.
    v2.0 and v2.1 scores are not comparable. The score is CLIP-T's (cosine) on that model."""

    default_model = "HPS_v2.1_compressed.pt"
    arch = "ViT-H-14"
    weights = "xswu/HPSv2: HPS_v2.1_compressed.pt (Apache-2.0), a separate ~2 GB download; pass model=PATH"

    @classmethod
    def load(cls, model=None, device=None, arch=None, **kw):
        path = resolve(model or cls.default_model)
        if not Path(path).is_file():
            raise FileNotFoundError(f"hpsv2 needs its checkpoint file: download HPS_v2.1_compressed.pt from "
                                    f"xswu/HPSv2 and pass model=/path/to/it (got {model or cls.default_model!r})")
        return cls(OpenClip.load(arch or cls.arch, pretrained=path, state_dict_key="state_dict", mode="pad"), device)

    @classmethod
    def tiny(cls, device=None, **kw):
        b = _tiny_open_clip()
        b.mode = "pad"
        return cls(b, device)


class AestheticMLP(nn.Module):
    """LAION aesthetic predictor v2 head (christophschuhmann/improved-aesthetic-predictor):
    768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout 0.2, 0.2, 0.1 and no activations; 927,969 params.
    Layer names match the released ``sac+logos+ava1-l14-linearMSE.pth`` state dict."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


@REWARDS.register("aesthetic")
class Aesthetic(Reward):
    """LAION aesthetic score v2: ``AestheticMLP`` on the L2-normalised CLIP ViT-L/14 image embedding,
    a ~1-10 rating. Backbone ``openai/clip-vit-large-patch14`` (MIT); head weights
    ``sac+logos+ava1-l14-linearMSE.pth`` (no licence stated by the authors; separate download,
    HF mirror camenduru/improved-aesthetic-predictor) -- pass ``head=PATH``."""

    differentiable = True
    default_model = "openai/clip-vit-large-patch14"
    weights = "CLIP ViT-L/14 (MIT) + sac+logos+ava1-l14-linearMSE.pth head (no licence stated; pass head=PATH)"

    def __init__(self, backbone, head: AestheticMLP, device=None):
        super().__init__(backbone, device)
        self.head = head.eval().to(self.device)

    @classmethod
    def load(cls, model=None, device=None, head=None, **kw):
        if head is None:
            raise FileNotFoundError("aesthetic needs its MLP head: download sac+logos+ava1-l14-linearMSE.pth and "
                                    "pass head=/path/to/it (mmalign score --reward-arg aesthetic.head=PATH)")
        mlp = AestheticMLP()
        load_state(mlp, resolve(head))
        return cls(_load_clip(model or cls.default_model), mlp, device)

    @classmethod
    def tiny(cls, device=None, **kw):
        torch.manual_seed(0)
        return cls(_tiny_hf_clip(projection_dim=768), AestheticMLP(768), device)

    def _score(self, images, prompts, references):
        return self.head(self.backbone.image_features(images)).squeeze(-1)


@REWARDS.register("retrieval")
class Retrieval(ClipScore):
    """Discriminative reward (Dessi et al. 2023, arXiv 2304.01662): the probability that each text
    retrieves its own image among the candidates -- by default the other images scored in the same
    call: p_i = softmax_j(s * cos(t_i, v_j))[i], s = CLIP's logit scale. Identical candidates give 1/N.
    Scored as a whole set (not batched), since every image is a candidate for every text."""

    def score(self, images, prompts=None, references=None, batch_size: int = 32, differentiable: bool = False):
        self._check(len(images), prompts, references)
        ctx = torch.enable_grad() if differentiable else torch.no_grad()
        with ctx:
            img = torch.cat([self.backbone.image_features(images[lo: lo + batch_size])
                             for lo in range(0, len(images), batch_size)])
            txt = self.backbone.text_features(prompts)
            logits = self.backbone.logit_scale * txt @ img.T
            p = torch.softmax(logits, dim=-1).diagonal()
        return p if differentiable else p.float().cpu()


@REWARDS.register("lambda_harmonic")
class LambdaHarmonic(ClipScore):
    """RPO's lambda-harmonic reward (``lambda_harmonic``): harmonic trade-off between similarity to the
    reference (subject) images and to the prompt, each cosine mapped by (cos + 1) / 2. ``lam`` = 0.5
    for checkpoint selection, 0 for RPO's training labels. The paper scores with ALIGN
    (``kakaobrain/align-base``, loadable here as model=...); the default backbone is CLIP ViT-B/32."""

    needs_references = True

    def __init__(self, backbone, device=None, lam: float = 0.5):
        super().__init__(backbone, device)
        self.lam = lam

    @classmethod
    def load(cls, model=None, device=None, lam: float = 0.5, **kw):
        return cls(_load_clip(model or cls.default_model, **kw), device, lam)

    @classmethod
    def tiny(cls, device=None, lam: float = 0.5, **kw):
        return cls(_tiny_hf_clip(), device, lam)

    def _score(self, images, prompts, references):
        img = self.backbone.image_features(images)
        s_i2i = ((img @ self._ref_features(references).T + 1) / 2).mean(-1)
        s_t2i = ((img * self.backbone.text_features(prompts)).sum(-1) + 1) / 2
        return lambda_harmonic(s_i2i, s_t2i, self.lam)


@REWARDS.register("dino")
class Dino(Reward):
    """DreamBench DINO: mean cosine between the [CLS] embeddings of the image and of the reference
    (subject) images under DINO ViT-S/16 (``facebook/dino-vits16``, Apache-2.0)."""

    needs_references = True
    default_model = "facebook/dino-vits16"
    weights = "facebook/dino-vits16 (Apache-2.0)"
    backbone_cls = DinoViT

    @classmethod
    def tiny(cls, device=None, **kw):
        from transformers import ViTConfig, ViTModel

        torch.manual_seed(0)
        m = ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=37), add_pooling_layer=False)
        return cls(DinoViT(m, size=32), device)

    def _score(self, images, prompts, references):
        return (self.backbone.image_features(images) @ self._ref_features(references).T).mean(-1)


@REWARDS.register("toy_clip")
class ToyClip(Reward):
    """A small open_clip model trained by ``scripts/train_toy_clip.py`` on the procedural shapes world
    and shipped in ``assets/models/toy-clip`` (so scoring works offline out of the box).
    Score = cosine between image and prompt embeddings. Only meaningful on shapes-world images."""

    needs_prompts = True
    differentiable = True
    default_model = str(TOY_CLIP)
    weights = "shipped in assets/models/toy-clip (trained here; Apache-2.0 like the project)"
    backbone_cls = OpenClip

    @classmethod
    def tiny(cls, device=None, **kw):
        return cls(_tiny_open_clip(), device)

    def _score(self, images, prompts, references):
        return (self.backbone.image_features(images) * self.backbone.text_features(prompts)).sum(-1)


@REWARDS.register("world")
class WorldReward(Reward):
    """A plug-in world's programmatic oracle (``mmalign.worlds``): how well each image shows its prompt, in
    [0, 1] for the shapes world (colour share + shape match). ``world=NAME`` (default ``shapes``)."""

    needs_prompts = True
    weights = "none: the oracle of a plug-in world (world=NAME, default shapes)"

    def __init__(self, world, device=None):
        self.world, self.backbone = world, None
        self.device = torch.device(device) if device else torch.device("cpu")

    @classmethod
    def load(cls, model=None, device=None, world: str | None = None, **kw):
        from mmalign.worlds import get_world  # the registry of plug-ins, by name (never the plug-in itself)

        return cls(get_world(world or model or "shapes"), device)

    @classmethod
    def tiny(cls, device=None, **kw):
        return cls.load(device=device, **kw)

    def _score(self, images, prompts, references):
        return torch.tensor(self.world.reward(images, prompts), dtype=torch.float32)


def _load_clip(model: str, processor: str | None = None, **kw):
    """``open_clip:NAME[@pretrained]``, an open_clip ``local-dir``, or a transformers CLIP/ALIGN id/path."""
    if model.startswith("open_clip:"):
        name, _, pre = model.removeprefix("open_clip:").partition("@")
        return OpenClip.load(name, pretrained=pre or None)
    p = Path(resolve(model))
    if p.is_dir() and (p / "open_clip_config.json").exists():
        return OpenClip.load(str(p))
    return HFClip.load(model, processor=processor)


def load_reward(name: str, model: str | None = None, device=None, tiny: bool = False, **kw) -> Reward:
    """``REWARDS[name]`` loaded with real weights (``model=`` hub id / path) or ``tiny=True`` random."""
    cls = REWARDS[name]
    return cls.tiny(device=device, **kw) if tiny else cls.load(model=model, device=device, **kw)


def reward_table() -> list[list[str]]:
    rows = []
    for name in sorted(REWARDS):
        c = REWARDS[name]
        needs = ", ".join([x for x, f in (("prompts", c.needs_prompts), ("references", c.needs_references)) if f]) or "-"
        rows.append([name, needs, c.weights])
    return rows





__all__ = ["REWARDS", "Reward", "load_reward", "lambda_harmonic", "reward_table", "AestheticMLP"]
