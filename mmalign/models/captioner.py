"""Image captioners behind one interface, for RL fine-tuning and for ``mmalign caption``.

A captioner turns images into a *context* (``encode``), scores caption token sequences given the
context (``sequence_logps``: sum of caption-token log-probs in fp32, the same score definition as the
text-LM adapter) and decodes (``sample`` / ``greedy``). Caption sequences are ``[bos] tokens [eos]``,
right-padded.

* ``ClipCapCaptioner`` (Mokady et al. 2021, arXiv 2111.09734): a frozen CLIP image encoder (open_clip),
  an MLP mapping the image embedding to ``prefix_len`` prefix embeddings, and a GPT-2 decoder.
* ``BlipCaptioner``: transformers' ``BlipForConditionalGeneration`` (vision transformer + text decoder
  cross-attending to the image tokens).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from mmalign.data.records import DataError
from mmalign.models.lm import TokenLogps, selective_log_softmax
from mmalign.paths import ASSETS, resolve
from mmalign.rewards.backbones import OpenClip, preprocess
from mmalign.rewards.models import _tiny_open_clip

Tensor = torch.Tensor
TINY_TOKENIZER = ASSETS / "tokenizers" / "tiny-clip-bpe"


class Captioner(nn.Module):
    """Common decoding and scoring; subclasses implement ``preprocess``, ``encode`` and ``logits``."""

    max_len = 16

    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Captions -> ``[bos] tokens [eos]`` ids and attention mask (right-padded)."""
        tok = self.tokenizer
        seqs = [[self.bos_id] + tok(c, add_special_tokens=False)["input_ids"][: self.max_len - 2] + [self.eos_id]
                for c in captions]
        t = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), t), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), t), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return ids.to(self.device), mask.to(self.device)

    def decode(self, ids: Tensor) -> list[str]:
        out = []
        for row in ids.tolist():
            row = row[1:]  # drop bos
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            out.append(self.tokenizer.decode([t for t in row if t != self.pad_id], skip_special_tokens=True).strip())
        return out

    @property
    def device(self):
        return next(self.parameters()).device

    def sequence_logps(self, context, ids: Tensor, mask: Tensor) -> TokenLogps:
        """Sum of caption-token log-probs (everything after bos, eos included), fp32."""
        logits = self.logits(context, ids, mask)[:, :-1]
        m = mask[:, 1:].to(torch.float32)
        return TokenLogps(selective_log_softmax(logits, ids[:, 1:]) * m, m)

    @torch.no_grad()
    def sample(self, context, n: int = 1, temperature: float = 1.0, greedy: bool = False,
               generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Autoregressive decoding of ``n`` captions per context row; returns (ids, mask) of shape [B*n, T]."""
        context = self.repeat_context(context, n)
        b = self.context_len(context)
        ids = torch.full((b, 1), self.bos_id, dtype=torch.long, device=self.device)
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        for _ in range(self.max_len - 1):
            mask = torch.ones_like(ids)
            logits = self.logits(context, ids, mask)[:, -1].float()
            if greedy:
                nxt = logits.argmax(-1)
            else:
                probs = torch.softmax(logits / temperature, -1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(self.device)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= nxt == self.eos_id
            if bool(done.all()):
                break
        mask = torch.ones_like(ids)
        for i in range(b):  # everything after the first eos is padding
            row = ids[i, 1:].tolist()
            if self.eos_id in row:
                mask[i, row.index(self.eos_id) + 2:] = 0
        return ids.masked_fill(mask == 0, self.pad_id), mask

    @torch.no_grad()
    def caption(self, images, batch_size: int = 32) -> list[str]:
        out = []
        for lo in range(0, len(images), batch_size):
            ctx = self.encode(self.preprocess(images[lo: lo + batch_size]))
            out += self.decode(self.sample(ctx, greedy=True)[0])
        return out


class ClipCapCaptioner(Captioner):
    def __init__(self, clip_backbone, gpt2, tokenizer, prefix_len: int = 4, clip_dim: int | None = None,
                 clip_path: str | None = None):
        super().__init__()
        self.clip_path = clip_path  # where ``load`` finds the CLIP encoder again
        self.clip = clip_backbone  # mmalign.rewards.backbones.OpenClip (frozen)
        self.clip_model = clip_backbone.model  # registered so .to() moves it
        self.clip_model.requires_grad_(False)
        self.gpt2, self.tokenizer, self.prefix_len = gpt2, tokenizer, prefix_len
        e = gpt2.config.n_embd
        d = clip_dim or clip_backbone.model.text_projection.shape[-1]
        self.mapper = nn.Sequential(nn.Linear(d, (e * prefix_len) // 2), nn.Tanh(), nn.Linear((e * prefix_len) // 2,
                                                                                                e * prefix_len))
        self.bos_id, self.eos_id, self.pad_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id

    def preprocess(self, images):
        return images  # the CLIP backbone preprocesses PIL images / [0, 1] tensors itself

    def encode(self, images) -> Tensor:
        with torch.no_grad():
            f = self.clip.image_features(images)
        return self.mapper(f).view(f.shape[0], self.prefix_len, -1)

    def repeat_context(self, ctx, n):
        return ctx.repeat_interleave(n, 0)

    def context_len(self, ctx):
        return ctx.shape[0]

    def logits(self, ctx: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        emb = self.gpt2.transformer.wte(ids)
        x = torch.cat([ctx.to(emb.dtype), emb], 1)
        m = torch.cat([torch.ones(ids.shape[0], self.prefix_len, dtype=mask.dtype, device=mask.device), mask], 1)
        return self.gpt2(inputs_embeds=x, attention_mask=m).logits[:, self.prefix_len:]

    def save(self, path):
        from safetensors.torch import save_file

        if self.clip_path is None:
            raise ValueError("ClipCapCaptioner.save needs clip_path (where its CLIP encoder can be loaded from)")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.gpt2.save_pretrained(path / "gpt2")
        self.tokenizer.save_pretrained(path / "tokenizer")
        save_file({k: v.contiguous() for k, v in self.mapper.state_dict().items()}, str(path / "mapper.safetensors"))
        (path / "captioner.json").write_text(json.dumps({"type": "clipcap", "prefix_len": self.prefix_len,
                                                        "clip": self.clip_path}))

    @classmethod
    def load(cls, path):
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, GPT2LMHeadModel


        path = Path(resolve(str(path)))
        meta = json.loads((path / "captioner.json").read_text())
        clip_path = resolve(meta["clip"])
        m = cls(OpenClip.load(clip_path), GPT2LMHeadModel.from_pretrained(path / "gpt2"),
                AutoTokenizer.from_pretrained(path / "tokenizer"), meta["prefix_len"], clip_path=meta["clip"])
        m.mapper.load_state_dict(load_file(str(path / "mapper.safetensors")))
        return m.eval()


class BlipCaptioner(Captioner):
    def __init__(self, model, tokenizer, image_size: int, mean, std):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.size, self.mean, self.std = image_size, mean, std
        tc = model.config.text_config
        self.bos_id, self.eos_id = tc.bos_token_id, tc.sep_token_id if tc.sep_token_id is not None else tc.eos_token_id
        self.pad_id = tc.pad_token_id

    @classmethod
    def load(cls, name_or_path: str):
        from transformers import AutoProcessor, BlipForConditionalGeneration

        path = resolve(name_or_path)
        model = BlipForConditionalGeneration.from_pretrained(path)
        proc = AutoProcessor.from_pretrained(path)
        ip = proc.image_processor
        return cls(model, proc.tokenizer, model.config.vision_config.image_size, tuple(ip.image_mean),
                   tuple(ip.image_std)).eval()

    def preprocess(self, images) -> Tensor:
        return preprocess(images, self.size, self.mean, self.std, "crop").to(self.device)

    def encode(self, pixels: Tensor) -> Tensor:
        return self.model.vision_model(pixel_values=pixels).last_hidden_state

    def repeat_context(self, ctx, n):
        return ctx.repeat_interleave(n, 0)

    def context_len(self, ctx):
        return ctx.shape[0]

    def logits(self, ctx: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        return self.model.text_decoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=ctx).logits

    def save(self, path):
        self.model.save_pretrained(path)


def tiny_blip(seed: int = 0) -> BlipCaptioner:
    """BLIP at test size (transformers' test sizes) with the tiny BPE tokenizer."""
    from transformers import AutoTokenizer, BlipConfig, BlipForConditionalGeneration

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=37, max_position_embeddings=32, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, sep_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=37),
        projection_dim=32)
    return BlipCaptioner(BlipForConditionalGeneration(cfg), tok, 32, (0.48145466, 0.4578275, 0.40821073),
                         (0.26862954, 0.26130258, 0.27577711))


def tiny_clipcap(clip_backbone=None, seed: int = 0, n_layer: int = 2, n_embd: int = 64, prefix_len: int = 4):
    """ClipCap with a tiny GPT-2 over the tiny BPE vocabulary; the CLIP backbone defaults to a random
    tiny open_clip model (pass the shipped toy CLIP for the demo world)."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel


    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER))
    clip = clip_backbone or _tiny_open_clip(seed)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_layer=n_layer, n_embd=n_embd, n_head=4,
                                      n_positions=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      resid_pdrop=0, embd_pdrop=0, attn_pdrop=0))
    return ClipCapCaptioner(clip, gpt2, tok, prefix_len)


def load_captioner(name_or_path: str) -> Captioner:
    """A ClipCap folder (``captioner.json``) or a BLIP hub id / folder."""
    p = Path(resolve(name_or_path))
    if (p / "captioner.json").exists():
        return ClipCapCaptioner.load(p)
    try:
        return BlipCaptioner.load(name_or_path)
    except Exception as e:  # not a folder, not a hub id we can reach, not a BLIP checkpoint
        raise DataError(f"--model {name_or_path}: neither a ClipCap folder (captioner.json) nor a loadable BLIP "
                        f"model ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from e


def caption_images(captioner, images, batch_size: int = 32, progress: bool = True) -> list[str]:
    """Greedy captions for a list of PIL images, in batches, with a progress bar."""
    from tqdm.auto import tqdm

    caps: list[str] = []
    for lo in tqdm(range(0, len(images), batch_size), desc="captioning", dynamic_ncols=True, disable=not progress):
        caps += captioner.caption(images[lo: lo + batch_size], batch_size=batch_size)
    return caps
