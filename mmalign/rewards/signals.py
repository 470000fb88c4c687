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

from .models import REWARDS, Reward

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


def diversity(images, size: int = 16) -> float:
    """Mean pairwise Euclidean distance between a set's images (one prompt's samples), on images resized to
    ``size`` x ``size`` RGB in [0, 1] and divided by sqrt(3 * size^2) so the value is in [0, 1]. Identical images
    give 0. A pixel-space measure: cheap and model-free, blind to semantics (a perceptual or DINO distance is
    the stronger signal where those weights are available)."""
    from PIL import Image

    if len(images) < 2:
        return float("nan")
    x = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), dtype=np.float32).ravel() / 255.0
                  for im in images])
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)) / np.sqrt(x.shape[1])
    n = len(x)
    return float(d.sum() / (n * (n - 1)))


def feature_diversity(features: Tensor) -> float:
    """Mean pairwise cosine distance, (1 - cos) / 2 in [0, 1], between the rows of ``features`` (one embedding per
    image of a set); identical images give 0."""
    f = torch.nn.functional.normalize(features.float(), dim=-1)
    n = len(f)
    if n < 2:
        return float("nan")
    d = ((1 - f @ f.T) / 2).clamp_min(0)  # (rounding can put identical rows a hair below 0)
    return float(d.sum() / (n * (n - 1)))  # the zero diagonal left out of the mean


def dino_diversity(backbone):
    """A set measure for ``diversity_rows``: ``feature_diversity`` of DINO [CLS] embeddings (``DinoViT``, the
    ``dino`` reward's backbone) -- what changed in content, blind to pixel noise the pixel measure counts."""
    @torch.no_grad()
    def measure(images) -> float:
        return feature_diversity(backbone.image_features(images))

    return measure


class _Statistic(Reward):
    """An image statistic with the ``Reward`` interface (no model, no prompts)."""

    weights = "none (an image statistic)"
    fn = None

    def __init__(self, device=None):
        self.device = torch.device("cpu")

    @classmethod
    def load(cls, model=None, device=None, **kw):
        return cls(device)

    @classmethod
    def tiny(cls, device=None, **kw):
        return cls(device)

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
