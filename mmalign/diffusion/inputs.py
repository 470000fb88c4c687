"""Per-step model inputs for image preference pairs: the keyed random draws, latents and conditioning.

For every pair one CPU generator keyed by (seed, step, row) draws, in this order: the horizontal flip, the
caption dropout, the noise and t / sigma (``Family.draw``) and, for ``data.vae_latents=sample``, the VAE
posterior sample -- all shared by winner and loser. So a pair gets the same inputs on any number of
processes, after a resume, with or without the latent cache, and (``noise_draws`` K) from a fixed set of
K draws whose reference scores can be precomputed.
"""
from __future__ import annotations

from typing import Callable

import torch

from mmalign.utils import example_generator

from .data import ImagePairBatch, PairText
from .families import Cond, Family, sdxl_time_ids
from .options import PairDrawOptions
from .users import with_user_tokens

Tensor = torch.Tensor


class PairInputs:
    def __init__(self, family: Family, pipe, vae, options: PairDrawOptions, seed: int, device, dtype: torch.dtype,
                 user_tokens: Callable | None = None):
        """``options``: what is drawn per pair (the recipe's data section is one); ``user_tokens(batch, embeds) ->
        embeds``: PPD appends the pair's user tokens (None otherwise)."""
        self.family, self.pipe, self.vae, self.d, self.seed = family, pipe, vae, options, seed
        self.device, self.dtype, self.user_tokens = device, dtype, user_tokens
        self.empty: dict | None = None  # cached empty-prompt conditioning (caption dropout with a text cache)
        self.fills: dict = {}  # split -> CacheFill: a cache filled by the steps (data.cache_build=while_training)

    def draw_index(self, step: int, split: str) -> int:
        """Which of a pair's draws ``step`` uses (with the row, its generator's key): eval's one fixed draw, draw
        ``step % K`` of K fixed ones (``noise_draws``), or the step's own."""
        if split == "eval":
            return 0
        return step % self.d.noise_draws if self.d.noise_draws else step

    def generator(self, step: int, row: int, split: str) -> torch.Generator:
        salt = 2 if split == "eval" else 1 if self.d.noise_draws else 0
        return example_generator(self.seed, self.draw_index(step, split), row, salt=salt)

    def generators(self, batch: ImagePairBatch, step: int, split: str) -> list[torch.Generator]:
        return [self.generator(step, int(r), split) for r in batch.index]

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> Cond:
        """The pipeline's own ``encode_prompt`` (text part of the conditioning; SDXL time ids come per sample)."""
        return self.family.encode_prompts(self.pipe, captions, self.device)

    @torch.no_grad()
    def encode_pixels(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        """[B, 2, 3, H, W] in [-1, 1] -> VAE posterior (mean, std) [B, 2, C, h, w] in the model's latent space."""
        b = pixels.shape[0]
        x = pixels.flatten(0, 1).to(self.device, self.dtype)
        mean, std = self.family.latent_stats(self.vae, x)
        return mean.float().view(b, 2, *mean.shape[1:]), std.float().view(b, 2, *std.shape[1:])

    def build(self, batch: ImagePairBatch, gens: list[torch.Generator], split: str):
        """(x0 [B, 2, C, h, w], noise, t, cond for 2B samples) for a batch and its pairs' generators."""
        dev, d = self.device, self.d
        flip = [bool(torch.rand(1, generator=g) < 0.5) and d.random_flip and split == "train" for g in gens]
        drop = [bool(torch.rand(1, generator=g) < d.caption_dropout) for g in gens]
        fill = self.fills.get(split)
        if batch.latents is not None:
            x0, std = batch.latents.pick(flip)
            x0, std = x0.to(dev, torch.float32), None if std is None else std.to(dev, torch.float32)
        elif fill is not None:
            x0, std = self._fill_latents(batch, flip, fill)
            self._fill_text(batch, fill)
        else:
            x0, std = self.encode_pixels(torch.stack([p.flip(-1) if f else p for p, f in zip(batch.pixels, flip)]))
        noise, t = self.family.draw(tuple(x0.shape[2:]), gens, dev, shared=d.shared_noise)
        if d.vae_latents == "sample":  # z = mean + std * eps, eps per image from the pair's generator
            if std is None:
                raise ValueError("data.vae_latents=sample needs the posterior std: use a fresh data.cache_dir")
            eps = torch.stack([torch.randn(tuple(x0.shape[1:]), generator=g) for g in gens]).to(dev)
            x0 = x0 + std * eps
        cond = (self._cached_cond(batch.text, batch, drop) if batch.text is not None else self._encoded_cond(batch, drop)).float()
        if self.user_tokens is not None:
            cond.embeds = self.user_tokens(batch, cond.embeds)
        return x0, noise, t, cond

    def _fill_latents(self, batch: ImagePairBatch, flip: list[bool], fill) -> tuple[Tensor, Tensor | None]:
        """The drawn orientation of each pair from the fill, encoding (and keeping) those it does not hold yet:
        the VAE runs only for what this step draws, once per (row, orientation) over all passes."""
        rows = [int(r) for r in batch.index]
        for r in batch.unreadable_rows or []:
            fill.put(r, "bad", torch.ones(1))
        sfx = ["_flip" if f else "" for f in flip]
        std_too = self.d.vae_latents == "sample"
        miss = [i for i, r in enumerate(rows) if not fill.has(r, "latents" + sfx[i])]
        if miss:
            pix = torch.stack([batch.pixels[i].flip(-1) if flip[i] else batch.pixels[i] for i in miss])
            mean, sd = self.encode_pixels(pix)
            for j, i in enumerate(miss):
                fill.put(rows[i], "latents" + sfx[i], mean[j])
                if std_too:
                    fill.put(rows[i], "latents_std" + sfx[i], sd[j])
                fill.put(rows[i], "size", torch.cat([batch.original_size[i], batch.crop_top_left[i]]).float())
        x0 = torch.stack([fill.get(r, "latents" + s) for r, s in zip(rows, sfx)]).to(self.device, torch.float32)
        std = torch.stack([fill.get(r, "latents_std" + s) for r, s in zip(rows, sfx)]).to(
            self.device, torch.float32) if std_too else None
        return x0, std

    def _fill_text(self, batch: ImagePairBatch, fill):
        """Each caption's embeddings from the fill (encoded and kept when missing), set on the batch as the shard
        cache would: caption dropout then picks the empty prompt's, exactly as on a cached run."""
        rows = [int(r) for r in batch.index]
        if not rows:
            return
        sides = (("w", batch.captions), ("l", batch.captions_rejected)) if batch.captions_rejected is not None \
            else (("w", batch.captions),)
        got = {}
        for side, caps in sides:
            miss = [i for i, r in enumerate(rows) if not fill.has(r, f"embeds_{side}")]
            if miss:
                c = self.encode_text([caps[i] for i in miss])
                for j, i in enumerate(miss):
                    fill.put(rows[i], f"embeds_{side}", c.embeds[j])
                    if c.pooled is not None:
                        fill.put(rows[i], f"pooled_{side}", c.pooled[j])
            got[f"embeds_{side}"] = torch.stack([fill.get(r, f"embeds_{side}") for r in rows])
            if fill.has(rows[0], f"pooled_{side}"):
                got[f"pooled_{side}"] = torch.stack([fill.get(r, f"pooled_{side}") for r in rows])
        batch.text = PairText(**got)

    def _encoded_cond(self, batch: ImagePairBatch, drop: list[bool]) -> Cond:
        caps_w = ["" if dr else c for c, dr in zip(batch.captions, drop)]
        caps_l = caps_w if batch.captions_rejected is None else \
            ["" if dr else c for c, dr in zip(batch.captions_rejected, drop)]
        fin = lambda c: self.family.finish_cond(c, batch.original_size, batch.crop_top_left, self.d.resolution)  # noqa: E731
        cond_w = fin(self.encode_text(caps_w))
        return cond_w.cat(cond_w if caps_l is caps_w else fin(self.encode_text(caps_l)))

    def _cached_cond(self, text: PairText, batch: ImagePairBatch, drop: list[bool]) -> Cond:
        dev = self.device
        keep = torch.tensor([not d for d in drop], device=dev)
        empty = self.empty or {}

        def pick(x, key):
            x = x.to(dev, torch.float32)
            if key not in empty:
                return x
            e = empty[key].to(dev, torch.float32)
            return torch.where(keep.view(-1, *[1] * (x.dim() - 1)), x, e.expand_as(x))

        ew = pick(text.embeds_w, "embeds")
        el = ew if text.embeds_l is None else pick(text.embeds_l, "embeds")
        pw = pl = tid = None
        if text.pooled_w is not None:
            pw = pick(text.pooled_w, "pooled")
            pl = pw if text.pooled_l is None else pick(text.pooled_l, "pooled")
        if self.family.kind == "sdxl":
            tid = sdxl_time_ids(batch.original_size.to(dev), batch.crop_top_left.to(dev), self.d.resolution)
        txt = empty["txt_ids"].to(dev, torch.float32) if "txt_ids" in empty else None
        return Cond(ew, pw, tid, txt).cat(Cond(el, pl, tid, txt))


def ppd_user_tokens(user_emb: dict, denoiser) -> Callable:
    """PPD: a ``user_tokens`` hook appending each pair's user tokens (for both images) after the text."""
    def hook(batch: ImagePairBatch, embeds: Tensor) -> Tensor:
        missing = [u for u in batch.user_ids if str(u) not in user_emb]
        if missing:
            raise KeyError(f"unknown user_id {missing[0]!r}; known users: {sorted(user_emb)}")
        e = torch.stack([user_emb[str(u)] for u in batch.user_ids]).to(embeds.device)
        return with_user_tokens(embeds, torch.cat([e, e]), denoiser)

    return hook
