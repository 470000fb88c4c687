"""Cheap signals that reward hacking leaves in images, for the held-out panel of an online run and for
``mmalign score`` / ``mmalign eval``: colour saturation and brightness per image (``REWARDS`` entries, no
weights), and the diversity of a prompt's images (a set statistic, ``diversity``).

Peers report these failure modes: HPS favouring over-saturation (Pref-GRPO #2), an OCR reward darkening the
scene (dark-pixel fraction 0.45 -> 0.93, UniRL #407), collapsed diversity (GRPO-Guard, GARDO); see
``shared/reference/online-diffusion.md`` section 8.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmalign.data.records import DataError

from .backbones import DinoViT
from .models import REWARDS, Reward, pil_images

Tensor = torch.Tensor


def _rgb(images) -> np.ndarray:
    """PIL images (or a [N, 3, H, W] tensor in [0, 1]) -> float array [N, H, W, 3] in [0, 1]."""
    if isinstance(images, Tensor):
        return images.detach().float().permute(0, 2, 3, 1).cpu().numpy()
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])


def saturation(images) -> np.ndarray:
    """Mean HSV saturation per image: (max - min) / max over the RGB channels, 0 where max = 0."""
    x = _rgb(images)
    hi, lo = x.max(-1), x.min(-1)
    return np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-8), 0.0).mean(axis=(1, 2))


def brightness(images) -> np.ndarray:
    """Mean luma per image (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B), in [0, 1]."""
    x = _rgb(images)
    return (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).mean(axis=(1, 2))


def pixel_distances(images, size: int = 16) -> Tensor:
    """[N, N] Euclidean distances between images resized to ``size`` x ``size`` RGB in [0, 1], divided by
    sqrt(3 * size^2) so each is in [0, 1]."""
    from PIL import Image

    x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR),
                                              dtype=np.float32).ravel() / 255.0 for im in pil_images(images)]))
    return torch.cdist(x[None].double(), x[None].double())[0].float() / np.sqrt(x.shape[1])


def cosine_distances(features: Tensor) -> Tensor:
    """[N, N] cosine distances (1 - cos) / 2 in [0, 1] between the rows of ``features``."""
    f = torch.nn.functional.normalize(features.float(), dim=-1)
    return ((1 - f @ f.T) / 2).clamp_min(0)  # (rounding can put identical rows a hair below 0)


def _mean_off_diagonal(d: Tensor) -> float:
    n = len(d)
    return float("nan") if n < 2 else float(d.detach().clone().fill_diagonal_(0).sum() / (n * (n - 1)))


def diversity(images, size: int = 16) -> float:
    """Mean pairwise distance (``pixel_distances``) between a set's images (one prompt's samples); identical
    images give 0. A pixel-space measure: cheap and model-free, blind to semantics (``dino_diversity`` is the
    stronger signal where DINO weights are available)."""
    return float("nan") if len(images) < 2 else _mean_off_diagonal(pixel_distances(images, size))


def feature_diversity(features: Tensor) -> float:
    """Mean pairwise cosine distance, (1 - cos) / 2 in [0, 1], between the rows of ``features`` (one embedding per
    image of a set); identical images give 0."""
    return _mean_off_diagonal(cosine_distances(features))  # the zero diagonal left out of the mean


def dino_diversity(backbone):
    """A set measure for ``diversity_rows``: ``feature_diversity`` of DINO [CLS] embeddings (``DinoViT``, the
    ``dino`` reward's backbone) -- what changed in content, blind to pixel noise the pixel measure counts."""
    @torch.no_grad()
    def measure(images) -> float:
        return feature_diversity(backbone.image_features(images))

    return measure


class _NoModel(Reward):
    """A signal with no weights: loading and the tiny version are the same object, on the CPU."""

    def __init__(self, device=None):
        self.device = torch.device("cpu")

    @classmethod
    def load(cls, model=None, device=None, **kw):
        return cls(device)

    @classmethod
    def tiny(cls, device=None, **kw):
        return cls(device)


class _Statistic(_NoModel):
    """An image statistic with the ``Reward`` interface (no model, no prompts)."""

    weights = "none (an image statistic)"
    fn = None

    def _score(self, images, prompts, references):
        return torch.tensor(type(self).fn(images), dtype=torch.float32)


@REWARDS.register("saturation")
class Saturation(_Statistic):
    """Mean HSV colour saturation of the image (a hacking signal: over-saturation)."""

    fn = staticmethod(saturation)


@REWARDS.register("brightness")
class Brightness(_Statistic):
    """Mean luma of the image, BT.601 weights (a hacking signal: washed-out or darkened images)."""

    fn = staticmethod(brightness)


class _SetSignal(Reward):
    """Diversity as a per-image score: each image's mean distance to the other images scored with the same prompt
    in the same call (a group's samples in group RL, a prompt's seeds in a folder). Averaged over one prompt's
    images it is that set's diversity (``diversity`` / ``feature_diversity``). An image whose prompt has no other
    image in the call scores NaN: there is nothing to be diverse from. The whole call is one set of sets, so
    ``batch_size`` only bounds the feature batches."""

    needs_prompts = True

    def distances(self, images, batch_size: int) -> Tensor:
        raise NotImplementedError

    def score(self, images, prompts=None, references=None, batch_size: int = 32, differentiable: bool = False) -> Tensor:
        self._check(len(images), prompts, references)
        if differentiable:
            raise ValueError(f"reward {self.registry_name!r} has no differentiable mode")
        with torch.no_grad():
            d = self.distances(images, batch_size).float().cpu()
        same = torch.tensor([[a == b for b in prompts] for a in prompts])
        same.fill_diagonal_(False)
        n = same.sum(1)
        return torch.where(n > 0, (d * same).sum(1) / n.clamp_min(1), torch.tensor(float("nan")))


@REWARDS.register("diversity")
class PixelDiversity(_SetSignal, _NoModel):
    """Per image: mean pixel distance (``pixel_distances``, 16 x 16 RGB) to the other images of its prompt in the
    same call; NaN for a prompt with one image. A hacking signal: collapsed samples score near 0."""

    weights = "none (a statistic of each prompt's images)"

    def distances(self, images, batch_size):
        return pixel_distances(images)


@REWARDS.register("diversity_dino")
class DinoDiversity(_SetSignal):
    """Per image: mean cosine distance, (1 - cos) / 2, between its DINO ViT-S/16 [CLS] embedding and those of the
    other images of its prompt in the same call (the ``dino`` reward's backbone); NaN for a prompt with one image."""

    default_model = "facebook/dino-vits16"
    weights = "facebook/dino-vits16 (Apache-2.0)"
    backbone_cls = DinoViT

    @classmethod
    def tiny(cls, device=None, **kw):
        return cls(REWARDS["dino"].tiny(device=device).backbone, device)

    def distances(self, images, batch_size):
        feats = [self.backbone.image_features(images[lo: lo + batch_size]) for lo in range(0, len(images), batch_size)]
        return cosine_distances(torch.cat(feats))


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def fid_kid(folder: str | Path, reference: str | Path, weights: str | None = None, device=None,
            batch_size: int = 32, kid_subset_size: int = 1000) -> dict:
    """FID and KID of the images in ``folder`` against those in ``reference``, computed by ``torch-fidelity``
    (its InceptionV3 port, which matches the TensorFlow reference implementations; Heusel et al. 2017, eq. 6;
    Binkowski et al. 2018). ``weights``: a local copy of torch-fidelity's Inception weights
    (``pt_inception-2015-12-05``); None downloads them once. KID is the mean (and std) over subsets of
    ``min(kid_subset_size, images in the smaller folder)``. Returns {fid, kid, kid_std, images, reference_images}."""
    try:
        import torch_fidelity
    except ImportError as e:
        raise ImportError("FID / KID need torch-fidelity: pip install torch-fidelity") from e

    counts = {}
    for name, p in (("folder", folder), ("reference", reference)):
        p = Path(p)
        if not p.is_dir():
            raise DataError(f"FID / KID: {name} {p} is not a folder of images")
        counts[name] = sum(1 for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if counts[name] < 2:
            raise DataError(f"FID / KID: {name} {p} has {counts[name]} PNG / JPEG image(s); at least 2 are needed")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    m = torch_fidelity.calculate_metrics(
        input1=str(folder), input2=str(reference), fid=True, kid=True, cuda=dev.type == "cuda", batch_size=batch_size,
        kid_subset_size=min(kid_subset_size, *counts.values()), feature_extractor_weights_path=weights,
        cache=False, verbose=False, samples_find_deep=False, save_cpu_ram=dev.type != "cuda")  # (no worker processes)
    return {"fid": float(m["frechet_inception_distance"]), "kid": float(m["kernel_inception_distance_mean"]),
            "kid_std": float(m["kernel_inception_distance_std"]), "images": counts["folder"],
            "reference_images": counts["reference"]}
