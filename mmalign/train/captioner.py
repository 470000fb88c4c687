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

from mmalign.data.images import list_images, read_images
from mmalign.models.captioner import load_captioner, tiny_blip, tiny_clipcap
from mmalign.rewards.backbones import OpenClip
from mmalign.rewards.caption import CaptionReward
from mmalign.worlds import get_world

from .loop import StepOutput, example_generator
from .recipe import RecipeBase, run_recipe
from .sections import CaptionerConfig

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
    """Training images: a folder/glob, or ``n`` renders of a plug-in world (``mmalign.worlds``)."""

    def __init__(self, images: str | None = None, world_images: int = 0, seed: int = 0, world: str = "shapes"):
        self.world = None
        if world_images:
            self.world = get_world(world)
            self.images = [im for im, _ in self.world.sample(world_images, seed)]
        else:
            _, self.images, bad = read_images(list_images(images))
            if not self.images:
                raise ValueError(f"no readable images at {images!r}")

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return int(i)

    def collate(self, idx):
        return ImageBatch([self.images[i] for i in idx], torch.tensor(idx))


class CaptionerRecipe(RecipeBase):
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

                    captioner = tiny_clipcap(OpenClip.load(clip) if clip else None, **t)
                    captioner.clip_path = clip
            else:
                captioner = load_captioner(m.name_or_path)
        self.captioner = captioner.to(accelerator.device).train()
        self.policy = self.model = self.captioner
        self.reward = CaptionReward.from_config(cfg.reward, accelerator.device)
        d = cfg.data
        self.train_data = ImageSet(d.images, d.world_images, d.seed, d.world)
        self.eval_data = (ImageSet(d.eval_images, d.eval_world_images, d.seed + 1, d.world)
                          if d.eval_images or d.eval_world_images else None)
        self.baseline_ema = None  # rl.baseline=ema: running mean reward
        self.loss_fn, self.hp = cfg.loss.fn, dict(cfg.loss.params)

    def describe(self) -> str:
        n = sum(p.numel() for p in self.trainable_parameters())
        r = self.cfg.reward
        rw = "retrieval" if r.kind == "retrieval" else f"{r.clip_weight:g} CLIP-S + {r.grammar_weight:g} grammar"
        return (f"captioner/{type(self.captioner).__name__} ({n / 1e6:.2f}M trainable) | reward {rw} | "
                f"{self.cfg.rl.samples} samples, {self.cfg.rl.baseline} baseline | {len(self.train_data)} images")

    def extra_state(self):
        return {"baseline_ema": self.baseline_ema} if self.baseline_ema is not None else {}

    def load_extra_state(self, state):
        self.baseline_ema = state.get("baseline_ema", self.baseline_ema)

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
                self.baseline_ema = mean if self.baseline_ema is None else \
                    rl.ema_momentum * self.baseline_ema + (1 - rl.ema_momentum) * mean
                base = torch.full_like(r, self.baseline_ema)
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
               "fluency": float(np.mean([bool(TEMPLATE.match(c)) for c in caps])) if self.eval_data.world else
               float("nan")}
        rr = CaptionReward(self.reward.backbone, kind="retrieval")
        out["retrieval_acc"] = retrieval_accuracy(rr, images, caps)
        if self.eval_data.world is not None:
            out["content_accuracy"] = self.eval_data.world.caption_accuracy(images, caps)
        self.last_captions = caps
        return out

    def export(self, out_dir, card: dict | None = None):
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
    return run_recipe(CaptionerRecipe, cfg, accelerator, captioner=captioner)
