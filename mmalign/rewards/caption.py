"""Caption rewards: CLIP-S with the grammar-aware text encoder (Cho et al. 2022, "Fine-grained Image
Captioning with CLIP Reward", arXiv 2205.13115) and the discriminative retrieval reward (Dessi et al.
2023, arXiv 2304.01662).

Grammar: a head ``Linear(d, d, bias=False) - ReLU - Linear(d, 2, bias=False)`` on the CLIP text
feature predicts whether a caption is well-formed; it is trained (with the text encoder) on captions
corrupted by exactly one of repeat / remove / insert / swap / shuffle (``corrupt_caption``).
Deviation: the head reads the projected text embedding (the original reads the pooler output before
the projection), so it works with any CLIP backbone.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from mmalign.paths import resolve
from mmalign.rewards.models import _load_clip, _tiny_open_clip

Tensor = torch.Tensor
OPS = ("repeat", "remove", "insert", "swap", "shuffle")


class GrammarHead(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, dim, bias=False), nn.ReLU(), nn.Linear(dim, 2, bias=False))

    def forward(self, text_features: Tensor) -> Tensor:
        return self.net(text_features)

    def prob(self, text_features: Tensor) -> Tensor:
        """P(grammatical) = softmax(head)[:, 1]."""
        return torch.softmax(self.forward(text_features).float(), -1)[:, 1]


def corrupt_caption(text: str, rng: random.Random, vocab: list[str]) -> tuple[str, str]:
    """Exactly one corruption (Cho et al., retrieval/text_utils.py): repeat an n-gram (n <= 3) 1-3 times,
    remove an n-gram, insert 1-3 random vocabulary words, swap 1-3 words for random ones, or shuffle all
    words. Returns (corrupted text, operation); the result always differs from the input."""
    words = text.split()
    for _ in range(20):
        op = rng.choice(OPS)
        w = list(words)
        if op == "repeat":
            n = rng.randint(1, min(3, len(w)))
            i = rng.randrange(len(w) - n + 1)
            gram = w[i: i + n]
            for _ in range(rng.randint(1, 3)):
                w[i + n: i + n] = gram
        elif op == "remove" and len(w) > 1:
            n = rng.randint(1, min(3, len(w) - 1))
            i = rng.randrange(len(w) - n + 1)
            del w[i: i + n]
        elif op == "insert":
            for _ in range(rng.randint(1, 3)):
                w.insert(rng.randrange(len(w) + 1), rng.choice(vocab))
        elif op == "swap":
            for _ in range(rng.randint(1, min(3, len(w)))):
                w[rng.randrange(len(w))] = rng.choice(vocab)
        elif op == "shuffle":
            rng.shuffle(w)
        out = " ".join(w)
        if out != text:
            return out, op
    return text + " " + rng.choice(vocab), "insert"


class CaptionReward:
    """``kind='clip_s'``: clip_weight * 2.5 max(cos(image, prefix + caption), 0) + grammar_weight * P(grammatical)
    (grammar needs ``grammar_head.safetensors`` next to the CLIP weights).
    ``kind='retrieval'``: log p(image_i | caption) among the images scored together (logit-scaled cosines)."""

    def __init__(self, backbone, kind: str = "clip_s", prefix: str = "A photo depicts ", clip_weight: float = 1.0,
                 grammar_weight: float = 0.0, grammar_head: GrammarHead | None = None):
        self.backbone, self.kind, self.prefix = backbone, kind, prefix
        self.clip_weight, self.grammar_weight, self.head = clip_weight, grammar_weight, grammar_head
        if grammar_weight and grammar_head is None:
            raise ValueError("reward.grammar_weight > 0 needs a grammar head (grammar_head.safetensors in reward.model)")

    @classmethod
    def from_config(cls, section, device=None):
        backbone = _tiny_open_clip() if section.tiny else _load_clip(section.model or "openai/clip-vit-base-patch32")
        head = None
        if section.model and (Path(resolve(section.model)) / "grammar_head.safetensors").exists():
            from safetensors.torch import load_file

            sd = load_file(str(Path(resolve(section.model)) / "grammar_head.safetensors"))
            head = GrammarHead(sd["net.0.weight"].shape[1])
            head.load_state_dict(sd)
        elif section.tiny and section.grammar_weight:
            torch.manual_seed(0)
            head = GrammarHead(backbone.model.text_projection.shape[-1])
        dev = torch.device(device) if device else torch.device("cpu")
        backbone.to(dev)
        if head is not None:
            head.to(dev).eval()
        return cls(backbone, section.kind, section.prefix, section.clip_weight, section.grammar_weight, head)

    @torch.no_grad()
    def __call__(self, images, captions: list[str], per_image: int = 1) -> Tensor:
        """``captions``: ``per_image`` captions for each image, image-major. Returns [len(captions)]."""
        img = self.backbone.image_features(images)
        if self.kind == "retrieval":
            txt = self.backbone.text_features(captions)
            logits = self.backbone.logit_scale * txt @ img.T  # [B*K, B]
            target = torch.arange(len(images), device=img.device).repeat_interleave(per_image)
            return F.log_softmax(logits.float(), -1).gather(1, target[:, None])[:, 0].cpu()
        txt = self.backbone.text_features([self.prefix + c for c in captions])
        r = self.clip_weight * 2.5 * (img.repeat_interleave(per_image, 0) * txt).sum(-1).clamp(min=0)
        if self.grammar_weight:
            r = r + self.grammar_weight * self.head.prob(txt if not self.prefix else
                                                         self.backbone.text_features(captions))
        return r.float().cpu()


def train_grammar(backbone, captions: list[str], images=None, steps: int = 300, batch_size: int = 64,
                  lr: float = 1e-4, head_lr: float = 1e-3, seed: int = 0, log_every: int = 50) -> GrammarHead:
    """The grammar-aware text encoder (Cho et al. 2022, Sec. 3.3): fine-tune the CLIP text encoder and a
    grammar head, L = L_grammar + L_contrastive. L_grammar = CE(head(f(c)), 1) + CE(head(f(corrupt(c))), 0)
    on each caption c and one corruption of it; L_contrastive (when ``images`` pairs with ``captions``) is
    the usual symmetric InfoNCE against the frozen image tower, which keeps CLIP-S meaningful.
    Vocabulary for insert/swap: the words of ``captions``. Returns the head; the backbone is trained in place."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    vocab = sorted({w for c in captions for w in c.split()})
    dev = backbone.device
    with torch.no_grad():
        dim = backbone.text_features(captions[:1]).shape[-1]
    head = GrammarHead(dim).to(dev)
    model = backbone.model
    model.train()
    text_params = [p for n, p in model.named_parameters() if not n.startswith(("visual", "vision_model"))
                   and "logit" not in n]
    for n, p in model.named_parameters():
        p.requires_grad_(any(p is q for q in text_params))
    opt = torch.optim.AdamW([{"params": text_params, "lr": lr}, {"params": head.parameters(), "lr": head_lr}],
                            weight_decay=0.01)
    img_feats = None
    if images is not None:
        with torch.no_grad():
            img_feats = torch.cat([backbone.image_features(images[i: i + 256]) for i in range(0, len(images), 256)])
    for step in range(steps):
        idx = [rng.randrange(len(captions)) for _ in range(batch_size)]
        good = [captions[i] for i in idx]
        bad = [corrupt_caption(c, rng, vocab)[0] for c in good]
        f = backbone.text_features(good + bad)
        target = torch.cat([torch.ones(len(good)), torch.zeros(len(bad))]).long().to(dev)
        logits = head(f)
        loss = F.cross_entropy(logits.float(), target)
        if img_feats is not None:
            sim = backbone.logit_scale.detach() * f[: len(good)] @ img_feats[idx].T
            ar = torch.arange(len(good), device=dev)
            loss = loss + (F.cross_entropy(sim, ar) + F.cross_entropy(sim.T, ar)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            acc = float((logits.argmax(-1) == target).float().mean())
            print(f"grammar step {step}: loss {loss.item():.4f} grammar acc {acc:.3f}", flush=True)
    model.eval()
    head.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return head


@torch.no_grad()
def grammar_accuracy(backbone, head: GrammarHead, captions: list[str], seed: int = 1) -> float:
    """Held-out check: the head calls each caption grammatical and one corruption of it not."""
    rng = random.Random(seed)
    vocab = sorted({w for c in captions for w in c.split()})
    bad = [corrupt_caption(c, rng, vocab)[0] for c in captions]
    p = head.prob(backbone.text_features(list(captions) + bad)).cpu()
    return float(((p[: len(captions)] > 0.5).float().sum() + (p[len(captions):] < 0.5).float().sum()) / len(p))


def save_grammar_clip(backbone, head: GrammarHead, source: str, out: str):
    """Write the fine-tuned CLIP (same layout as ``source``: open_clip local dir or transformers folder) plus
    ``grammar_head.safetensors``, loadable as ``reward.model: OUT``."""
    import shutil

    from safetensors.torch import save_file

    out_p, src = Path(out), Path(resolve(source))
    out_p.mkdir(parents=True, exist_ok=True)
    if src.is_dir():  # configs, tokenizer and image-processor files as they were
        for f in src.iterdir():
            if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".pt", ".pth")):
                shutil.copy(f, out_p / f.name)
    if (src / "open_clip_config.json").exists():
        sd = {k: v.detach().contiguous().cpu() for k, v in backbone.model.state_dict().items()}
        save_file(sd, str(out_p / "open_clip_model.safetensors"))
    else:  # transformers CLIP (a hub id's processor files must be saved next to it by the caller)
        backbone.model.save_pretrained(str(out_p))
        backbone.tokenizer.save_pretrained(str(out_p))
    save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()},
              str(out_p / "grammar_head.safetensors"))
