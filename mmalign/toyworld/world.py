"""A procedurally generated preference world: coloured shapes on a plain background.

Prompts look like ``"a red circle"``. ``oracle_score`` is the programmatic judge used to label
preference pairs and to measure alignment: how well an image shows the colour and the shape its
prompt asks for. Everything is deterministic given a seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (24, 24, 28)
IMAGE_SIZE = 32
# foreground area / bounding-box area of an ideal rendering
FILL_RATIO = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}


def describe(color: str, shape: str) -> str:
    """The world's prompt for a colour and shape: "a red circle", "an orange square"."""
    return f"{'an' if color[0] in 'aeiou' else 'a'} {color} {shape}"


@dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    size: int
    cx: int
    cy: int

    @property
    def prompt(self) -> str:
        return describe(self.color, self.shape)


def all_prompts() -> list[str]:
    return [describe(c, s) for c in COLORS for s in SHAPES]


def parse_prompt(prompt: str) -> tuple[str, str]:
    words = prompt.lower().replace(",", " ").split()
    color = next((w for w in words if w in COLORS), None)
    shape = next((w for w in words if w in SHAPES), None)
    if color is None or shape is None:
        raise ValueError(f"prompt {prompt!r} names no colour/shape of this world "
                         f"(colours {list(COLORS)}, shapes {list(SHAPES)})")
    return color, shape


def sample_scene(rng: random.Random, color: str | None = None, shape: str | None = None,
                 image_size: int = IMAGE_SIZE) -> Scene:
    s = image_size / 32
    size = int(rng.randint(11, 17) * s)
    jitter = int(4 * s)
    return Scene(color or rng.choice(list(COLORS)), shape or rng.choice(SHAPES), size,
                 image_size // 2 + rng.randint(-jitter, jitter), image_size // 2 + rng.randint(-jitter, jitter))


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> Image.Image:
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    d = ImageDraw.Draw(img)
    h = scene.size / 2
    x0, y0, x1, y1 = scene.cx - h, scene.cy - h, scene.cx + h, scene.cy + h
    fill = COLORS[scene.color]
    if scene.shape == "circle":
        d.ellipse([x0, y0, x1, y1], fill=fill)
    elif scene.shape == "square":
        d.rectangle([x0, y0, x1, y1], fill=fill)
    elif scene.shape == "triangle":
        d.polygon([(scene.cx, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return img


def _foreground(arr: np.ndarray) -> np.ndarray:
    dist = np.abs(arr.astype(np.float32) - np.array(BACKGROUND, np.float32)).sum(-1)
    return dist > 90


def analyse(image: Image.Image) -> dict:
    """Measured content of an image: dominant palette colour, fill ratio, foreground area share."""
    arr = np.asarray(image.convert("RGB"))
    fg = _foreground(arr)
    area = int(fg.sum())
    out = {"area": area / fg.size, "color": None, "color_purity": 0.0, "fill_ratio": 0.0, "shape": None}
    if area < 6:
        return out
    px = arr[fg].astype(np.float32)
    pal = np.array(list(COLORS.values()), np.float32)
    nearest = np.argmin(((px[:, None, :] - pal[None]) ** 2).sum(-1), axis=1)
    counts = np.bincount(nearest, minlength=len(pal))
    names = list(COLORS)
    out["color"] = names[int(counts.argmax())]
    out["color_counts"] = {n: int(c) / area for n, c in zip(names, counts)}
    out["color_purity"] = float(counts.max()) / area
    ys, xs = np.nonzero(fg)
    bbox = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    ratio = area / bbox
    out["fill_ratio"] = float(ratio)
    out["shape"] = min(SHAPES, key=lambda s: abs(FILL_RATIO[s] - ratio))
    return out


def oracle_score(image: Image.Image, prompt: str) -> float:
    """In [0, 1]: 0.5 * (share of foreground pixels in the asked colour) + 0.5 * shape match, where
    shape match is a Gaussian in the fill-ratio distance (sigma 0.08) to the asked shape's ideal ratio.
    Blank or tiny outputs score 0."""
    color, shape = parse_prompt(prompt)
    a = analyse(image)
    if a["color"] is None:
        return 0.0
    c = a["color_counts"][color]
    s = float(np.exp(-(((a["fill_ratio"] - FILL_RATIO[shape]) / 0.08) ** 2)))
    return 0.5 * c + 0.5 * s


def is_correct(image: Image.Image, prompt: str) -> bool:
    """Both the dominant colour and the nearest shape match the prompt."""
    color, shape = parse_prompt(prompt)
    a = analyse(image)
    return a["color"] == color and a["shape"] == shape


def make_dataset(n: int, seed: int = 0, image_size: int = IMAGE_SIZE) -> list[tuple[Image.Image, str, Scene]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        sc = sample_scene(rng, image_size=image_size)
        out.append((render(sc, image_size), sc.prompt, sc))
    return out


def synthetic_pairs(n: int, seed: int = 0, image_size: int = IMAGE_SIZE, ties: int = 0) -> list[dict]:
    """Pick-a-Pic-schema rows: the preferred image shows the prompt; the other has the wrong colour or
    shape. ``label_0`` is randomised (image 0 is the winner half the time); ``ties`` rows are 0.5/0.5."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good = sample_scene(rng, image_size=image_size)
        if rng.random() < 0.5:
            bad = Scene(rng.choice([c for c in COLORS if c != good.color]), good.shape, good.size, good.cx, good.cy)
        else:
            bad = Scene(good.color, rng.choice([s for s in SHAPES if s != good.shape]), good.size, good.cx, good.cy)
        a, b = render(good, image_size), render(bad, image_size)
        first = rng.random() < 0.5
        label = 0.5 if i < ties else (1.0 if first else 0.0)
        rows.append({"caption": good.prompt, "jpg_0": a if first else b, "jpg_1": b if first else a,
                     "label_0": label, "label_1": 1.0 - label, "ranking_id": i})
    return rows
