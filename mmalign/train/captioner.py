"""Recipe ``captioner``: reward fine-tuning of a captioner through the shared loop and loss core.

Per image: K captions are sampled (per-image generator keyed by seed/step/row), scored by the reward
(CLIP-S [+ grammar] or retrieval among the batch), and the advantage against a baseline -- the greedy
caption's reward (SCST), the mean of the image's other samples, or an EMA -- weights the caption's
summed token log-probability in the core's ``reinforce`` loss.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from mmalign.models.captioner import load_captioner, tiny_blip, tiny_clipcap
from mmalign.rewards.caption import CaptionReward

from .configs import CaptionerConfig
from .loop import StepOutput, eval_summary, example_generator, make_accelerator, train

Tensor = torch.Tensor
TEMPLATE = re.compile(r"^an? [a-z]+ [a-z]+$")


@dataclass
class ImageBatch:
    images: list
    index: Tensor

    def to(self, device):
        return self

    def __len__(self):
        return len(self.index)


class ImageSet(torch.utils.data.Dataset):
    """Training images: a folder/glob, or ``n`` rendered shapes-world scenes (with their true content)."""

    def __init__(self, images: str | None = None, shapes_world: int = 0, seed: int = 0):
        self.scenes = None
        if shapes_world:
            from mmalign.demo.world import make_dataset

            data = make_dataset(shapes_world, seed=seed)
            self.images, self.scenes = [d[0] for d in data], [d[2] for d in data]
        else:
            from mmalign.data.images import list_images, read_images

            _, self.images, bad = read_images(list_images(images))
            if not self.images:
                raise ValueError(f"no readable images at {images!r}")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return int(i)

    def collate(self, idx):
        return ImageBatch([self.images[i] for i in idx], torch.tensor(idx))


def content_accuracy(images, captions) -> float:
    """Shapes world: the caption names the image's measured colour and shape."""
    from mmalign.demo.world import analyse, parse_prompt

    ok = 0
    for im, c in zip(images, captions):
        try:
            col, shp = parse_prompt(c)
        except ValueError:
            continue
        a = analyse(im)
        ok += a["color"] == col and a["shape"] == shp
    return ok / max(1, len(captions))


class CaptionerRecipe:
    def __init__(self, cfg: CaptionerConfig, accelerator, captioner=None):
        self.cfg, self.acc = cfg, accelerator
        m = cfg.model
        if captioner is None:
            if m.tiny is not None:
                t = dict(m.tiny)
                kind = t.pop("kind", "clipcap")
                if kind == "blip":
                    captioner = tiny_blip(**t)
                else:
                    clip = t.pop("clip", None)
                    from mmalign.rewards.backbones import OpenClip

                    captioner = tiny_clipcap(OpenClip.load(clip) if clip else None, **t)
                    captioner.clip_path = clip
            else:
                captioner = load_captioner(m.name_or_path)
        self.captioner = captioner.to(accelerator.device).train()
        self.model = self.captioner
        self.reward = CaptionReward.from_config(cfg.reward, accelerator.device)
        d = cfg.data
        self.train_data = ImageSet(d.images, d.shapes_world, d.seed)
        self.eval_data = (ImageSet(d.eval_images, d.eval_shapes_world, d.seed + 1)
                          if d.eval_images or d.eval_shapes_world else None)
        self.ema = None
        self.loss_fn, self.hp = cfg.loss.fn, dict(cfg.loss.params)

    def describe(self) -> str:
        n = sum(p.numel() for p in self.trainable_parameters())
        r = self.cfg.reward
        rw = "retrieval" if r.kind == "retrieval" else f"{r.clip_weight:g} CLIP-S + {r.grammar_weight:g} grammar"
        return (f"captioner/{type(self.captioner).__name__} ({n / 1e6:.2f}M trainable) | reward {rw} | "
                f"{self.cfg.rl.samples} samples, {self.cfg.rl.baseline} baseline | {len(self.train_data)} images")

    def trainable_parameters(self):
        return [p for p in self.captioner.parameters() if p.requires_grad]

    def trainable_state(self):
        return {k: p.detach() for k, p in self.captioner.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state):
        params = dict(self.captioner.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def extra_state(self):
        return {"ema": self.ema} if self.ema is not None else {}

    def load_extra_state(self, d):
        self.ema = d.get("ema", self.ema)

    def compute(self, batch: ImageBatch, step: int = 0, split: str = "train") -> StepOutput:
        rl, cap = self.cfg.rl, self.captioner
        k = rl.samples
        ctx = cap.encode(cap.preprocess(batch.images))
        with torch.no_grad():
            ids, masks = [], []
            for i, row in enumerate(batch.index.tolist()):  # each image's own generator
                g = example_generator(self.cfg.train.seed, step, row)
                a, b = cap.sample(ctx[i: i + 1].detach(), n=k, temperature=rl.temperature, generator=g)
                ids.append(a)
                masks.append(b)
            t = max(x.shape[1] for x in ids)
            ids = torch.cat([torch.nn.functional.pad(x, (0, t - x.shape[1]), value=cap.pad_id) for x in ids])
            mask = torch.cat([torch.nn.functional.pad(x, (0, t - x.shape[1]), value=0) for x in masks])
            caps = cap.decode(ids)
            r = self.reward(batch.images, caps, per_image=k).view(len(batch), k)
            if rl.baseline == "greedy":
                g_caps = cap.decode(cap.sample(ctx.detach(), greedy=True)[0])
                base = self.reward(batch.images, g_caps).view(-1, 1)
            elif rl.baseline == "mean":  # leave-one-out mean of the image's other samples
                base = (r.sum(1, keepdim=True) - r) / max(1, k - 1)
            else:
                mean = float(r.mean())
                self.ema = mean if self.ema is None else rl.ema_momentum * self.ema + (1 - rl.ema_momentum) * mean
                base = torch.full_like(r, self.ema)
            adv = (r - base).to(self.acc.device)
        lp = cap.sequence_logps(cap.repeat_context(ctx, k), ids, mask).sum().view(len(batch), k)
        loss, m = self.loss_fn(lp, adv, **self.hp)
        m["reward"] = r.mean(1).to(loss.device)
        m["caption_length"] = (mask.sum(1).float() - 2).view(len(batch), k).mean(1).to(loss.device)
        return StepOutput(loss, m)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        if self.eval_data is None:
            return {}
        was = self.captioner.training
        self.captioner.eval()
        images = self.eval_data.images
        caps = self.captioner.caption(images)
        self.captioner.train(was)
        out = {"reward": float(self.reward(images, caps).mean()),
               "fluency": float(np.mean([bool(TEMPLATE.match(c)) for c in caps])) if self.eval_data.scenes else
               float("nan")}
        rr = CaptionReward(self.reward.backbone, kind="retrieval")
        out["retrieval_acc"] = retrieval_accuracy(rr, images, caps)
        if self.eval_data.scenes is not None:
            out["content_accuracy"] = content_accuracy(images, caps)
        self.last_captions = caps
        return out

    def export(self, out_dir):
        if self.acc.is_main_process and hasattr(self.captioner, "save"):
            if getattr(self.captioner, "clip_path", "") is None:
                return
            self.captioner.save(out_dir)


@torch.no_grad()
def retrieval_accuracy(reward: CaptionReward, images, captions, pool: int = 32) -> float:
    """R@1: each caption retrieves its own image among pools of ``pool`` images (CLIP cosines)."""
    hits = n = 0
    for lo in range(0, len(images), pool):
        ims, cs = images[lo: lo + pool], captions[lo: lo + pool]
        img = reward.backbone.image_features(ims)
        txt = reward.backbone.text_features(cs)
        hits += int(((txt @ img.T).argmax(-1).cpu() == torch.arange(len(ims))).sum())
        n += len(ims)
    return hits / max(1, n)


def run(cfg: CaptionerConfig, accelerator=None, captioner=None):
    from accelerate.utils import set_seed

    from mmalign.config import to_dict

    acc = accelerator or make_accelerator(cfg.train)
    set_seed(cfg.train.seed)
    recipe = CaptionerRecipe(cfg, acc, captioner)
    result = train(recipe, cfg.train, acc, config=to_dict(cfg))
    recipe.export(f"{cfg.train.output_dir}/final")
    eval_summary(result, acc)
    result.recipe = recipe
    return result
