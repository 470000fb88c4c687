"""PPD: personalised preference fine-tuning with user embeddings (Dang et al. 2025, "Personalized
Preference Fine-tuning of Diffusion Models", arXiv 2501.06655).

* A user embedding e_u summarises a few of the user's pairwise choices. The encoder is pluggable:
  ``ClipPreferenceEncoder`` (default) averages the CLIP-embedding difference chosen - rejected over the
  user's examples; the paper uses a VLM's hidden states (plug one in with the same ``embed`` signature).
* e_u enters the UNet through extra cross-attention tokens: ``UserTokens`` maps it to n tokens, and
  every cross-attention layer gets a decoupled branch (IP-Adapter style, as PPD describes)
      out = Attn(Q, K_txt, V_txt) + scale * Attn(Q, K_u, V_u)
  whose value projection starts at zero, so at initialisation the policy equals the base model (the
  DPO reference) and the loss starts at ln 2.
* Multi-user DPO trains on pairs with a ``user_id``; at sampling time embeddings can be interpolated.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor


class ClipPreferenceEncoder:
    """e_u = normalise(mean_k [f(chosen_k) - f(rejected_k)]) with any CLIP-style image encoder
    (a ``mmalign.rewards`` backbone)."""

    def __init__(self, backbone):
        self.backbone = backbone

    @torch.no_grad()
    def embed(self, chosen: list, rejected: list) -> Tensor:
        if not chosen or len(chosen) != len(rejected):
            raise ValueError(f"user embedding needs matching chosen/rejected examples, got {len(chosen)}/{len(rejected)}")
        d = self.backbone.image_features(chosen) - self.backbone.image_features(rejected)
        return F.normalize(d.mean(0), dim=-1).cpu()


def embed_users(pairs, encoder, examples_per_user: int) -> dict[str, Tensor]:
    """{user_id: e_u} from each user's first ``examples_per_user`` pairs of ``pairs`` (a ``PreferencePairs``
    with a user_id column); ``encoder.embed(chosen_images, rejected_images) -> [D]``."""
    by_user: dict = {}
    for i, uid in enumerate(pairs.ds["user_id"][j] for j in pairs.rows):
        if len(by_user.setdefault(str(uid), [])) < examples_per_user:
            by_user[str(uid)].append(i)
    out = {}
    for uid, rows in by_user.items():
        ims = [pairs.load_images(i) for i in rows]
        out[uid] = encoder.embed([a for a, _ in ims], [b for _, b in ims])
    return out


class UserTokens(nn.Module):
    """e_u [B, D] -> n tokens [B, n, cross_dim] (Linear + LayerNorm, as IP-Adapter's image projection)."""

    def __init__(self, user_dim: int, cross_dim: int, n_tokens: int = 4):
        super().__init__()
        self.n, self.cross_dim = n_tokens, cross_dim
        self.proj = nn.Linear(user_dim, n_tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, e: Tensor) -> Tensor:
        return self.norm(self.proj(e).view(e.shape[0], self.n, self.cross_dim))


class UserAttnProcessor(nn.Module):
    """Cross-attention with a decoupled user branch; the last ``n_tokens`` of ``encoder_hidden_states``
    are the user tokens. ``enabled=False`` (the reference pass) ignores them."""

    def __init__(self, hidden_size: int, cross_dim: int, n_tokens: int, scale: float = 1.0):
        super().__init__()
        self.n, self.scale, self.enabled = n_tokens, scale, True
        self.to_k_u = nn.Linear(cross_dim, hidden_size, bias=False)
        self.to_v_u = nn.Linear(cross_dim, hidden_size, bias=False)
        nn.init.zeros_(self.to_v_u.weight)  # identity at initialisation

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        text, user = encoder_hidden_states[:, : -self.n], encoder_hidden_states[:, -self.n:]
        b = hidden_states.shape[0]
        h = attn.heads

        def heads(x):
            return x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2)

        q = heads(attn.to_q(hidden_states))
        out = F.scaled_dot_product_attention(q, heads(attn.to_k(text)), heads(attn.to_v(text)))
        if self.enabled and self.scale:
            out = out + self.scale * F.scaled_dot_product_attention(q, heads(self.to_k_u(user)), heads(self.to_v_u(user)))
        out = out.transpose(1, 2).reshape(b, -1, h * q.shape[-1]).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def add_user_branch(unet, user_dim: int, n_tokens: int = 4, scale: float = 1.0) -> UserTokens:
    """Install ``UserAttnProcessor`` on every cross-attention layer of ``unet`` and attach a
    ``UserTokens`` module as ``unet.user_tokens``; all new weights are trainable."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    cross_dim = unet.config.cross_attention_dim
    procs = {}
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn2.processor"):
            attn = unet.get_submodule(name.removesuffix(".processor"))
            procs[name] = UserAttnProcessor(attn.to_q.out_features, cross_dim, n_tokens, scale)
        else:
            procs[name] = proc if not isinstance(proc, nn.Module) else AttnProcessor2_0()
    unet.set_attn_processor(procs)
    unet.user_tokens = UserTokens(user_dim, cross_dim, n_tokens)
    for m in user_modules(unet):
        m.requires_grad_(True)
    return unet.user_tokens


def user_modules(unet) -> list[nn.Module]:
    mods = [p for p in unet.attn_processors.values() if isinstance(p, UserAttnProcessor)]
    return mods + ([unet.user_tokens] if hasattr(unet, "user_tokens") else [])


@contextlib.contextmanager
def user_branch(unet, enabled: bool):
    """Turn the user branch of every cross-attention layer on or off (off = the base model)."""
    procs = [p for p in unet.attn_processors.values() if isinstance(p, UserAttnProcessor)]
    old = [p.enabled for p in procs]
    for p in procs:
        p.enabled = enabled
    try:
        yield
    finally:
        for p, o in zip(procs, old):
            p.enabled = o


def with_user_tokens(embeds: Tensor, user_emb: Tensor, unet) -> Tensor:
    """Append the user tokens of ``user_emb`` [B, D] to text embeddings [B, T, C]."""
    tok = unet.user_tokens(user_emb.to(embeds.device, embeds.dtype))
    return torch.cat([embeds, tok.to(embeds.dtype)], dim=1)


def interpolate(e1: Tensor, e2: Tensor, alpha: float) -> Tensor:
    """Linear interpolation between two user embeddings (alpha = 0 -> e1, 1 -> e2)."""
    return (1 - alpha) * e1 + alpha * e2


@torch.no_grad()
def sample_for_user(pipe, prompts: list[str], user_emb: Tensor, generators, steps: int = 20, guidance: float = 3.0,
                    height: int = 32, width: int = 32):
    """Sample with a user embedding (one [D] vector for every prompt) through a standard SD pipeline."""
    dev = pipe.device
    pos, neg = pipe.encode_prompt(prompts, device=dev, num_images_per_prompt=1, do_classifier_free_guidance=True,
                                  negative_prompt=[""] * len(prompts))
    e = user_emb.view(1, -1).expand(len(prompts), -1)
    pos, neg = with_user_tokens(pos, e, pipe.unet), with_user_tokens(neg, e, pipe.unet)
    return pipe(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=steps, guidance_scale=guidance,
                height=height, width=width, generator=generators).images


def load_user_branch(unet, folder) -> dict[str, Tensor]:
    """Install and load an exported PPD user branch into ``unet``; returns {user_id: embedding}."""
    import json
    from pathlib import Path

    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / "user_branch.json").read_text())
    emb = {k.removeprefix("user."): v for k, v in load_file(str(folder / "user_embeddings.safetensors")).items()}
    add_user_branch(unet, next(iter(emb.values())).numel(), meta["n_tokens"], meta["scale"])
    state = load_file(str(folder / "user_branch.safetensors"))
    unet.user_tokens.load_state_dict({k.removeprefix("tokens."): v for k, v in state.items() if k.startswith("tokens.")})
    for name, proc in unet.attn_processors.items():
        if isinstance(proc, UserAttnProcessor):
            proc.load_state_dict({k.removeprefix(f"attn.{name}."): v for k, v in state.items()
                                  if k.startswith(f"attn.{name}.")})
    return emb
