"""BDHS: preference data for MLLMs without annotators
(Amirloo et al. 2024, "Understanding Alignment in Multimodal LLMs", arXiv 2407.02477, Sec. 3.4, Alg. 1).

chosen   = the reference (ground-truth) answer, as is;
rejected = the policy's own answer with the image *partly blinded in latent space*: each image token is
           removed from attention unless u_i >= rho_th (u_i ~ U(0, 1); rho_th = 0.99 keeps ~1%), generated
           reference-guided -- for each sentence k of the reference, keep the ground-truth sentences before
           it plus a random prefix of sentence k and let the blinded model continue to "." or EOS (a leading
           yes/no is swapped with probability 0.5 first). If the result is too similar to the reference
           (cosine > 0.97), resample mask and cut points, up to 5 times; the last try is an unguided answer.

No extra annotation or external model is needed. Deviation: similarity defaults to a bag-of-words
cosine (the paper uses all-mpnet-base-v2, which is not bundled; pass any ``similarity`` callable).
"""
from __future__ import annotations

import math
import random
import re
from collections import Counter

from .models import generate, image_token_id

YES_NO = re.compile(r"^[\s]*(Yes|yes|No|no)")


def blind_mask_fn(processor, keep: float, rng: random.Random):
    """attention_mask hiding each image token unless a U(0,1) draw is >= 1 - keep."""
    tid = image_token_id(processor)

    def fn(input_ids, attention_mask):
        m = attention_mask.clone()
        pos = (input_ids == tid).nonzero(as_tuple=False)
        for b, t in pos.tolist():
            if rng.random() < 1.0 - keep:
                m[b, t] = 0
        return m

    return fn


def sentences(text: str) -> list[str]:
    return [s for s in re.findall(r"[^.!?]*[.!?]|[^.!?]+$", text.strip()) if s.strip()]


def bow_cosine(a: str, b: str) -> float:
    ca, cb = Counter(re.findall(r"\w+", a.lower())), Counter(re.findall(r"\w+", b.lower()))
    num = sum(ca[w] * cb[w] for w in ca)
    den = math.sqrt(sum(v * v for v in ca.values())) * math.sqrt(sum(v * v for v in cb.values()))
    return num / den if den else 0.0


def swap_yes_no(sentence: str, rng: random.Random) -> str:
    m = YES_NO.match(sentence)
    if m and rng.random() < 0.5:
        w = m.group(1)
        new = {"Yes": "No", "yes": "no", "No": "Yes", "no": "yes"}[w]
        return sentence[: m.start(1)] + new + sentence[m.end(1):]
    return sentence


def bdhs_rejected(model, processor, prompt: str, image, reference: str, rng: random.Random, keep: float = 0.01,
                  threshold: float = 0.97, iterations: int = 5, similarity=bow_cosine, max_new_tokens: int = 24) -> str:
    sents = sentences(reference) or [reference]
    out = ""
    for it in range(iterations):
        mask_fn = blind_mask_fn(processor, keep, rng)
        seed = rng.randrange(2**31)
        if it == iterations - 1:  # last resort: an unguided blinded answer, kept whatever its similarity
            return generate(model, processor, [prompt], [image], max_new_tokens, do_sample=True,
                            attention_mask_fn=mask_fn, generator_seed=seed)[0]
        parts = []
        for k, s in enumerate(sents):
            s = swap_yes_no(s, rng)
            words = s.split()
            cut = rng.randint(0, max(0, len(words) - 1))
            head = " ".join(words[:cut])
            prefix = " ".join(x.strip() for x in sents[:k])
            guide = " ".join(x for x in (prefix, head) if x)
            cont = generate(model, processor, [f"{prompt} {guide}".rstrip()], [image], max_new_tokens, do_sample=True,
                            attention_mask_fn=mask_fn, generator_seed=seed + k)[0]
            cont = re.split(r"(?<=[.!?])", cont, maxsplit=1)[0]
            parts.append(" ".join(x for x in (head, cont.strip()) if x))
        out = " " + " ".join(p for p in parts if p)
        if similarity(out, reference) <= threshold:
            return out
    return out


def bdhs_dataset(model, processor, rows: list[dict], seed: int = 0, **kw) -> list[dict]:
    """rows: {prompt, image (PIL), answer} -> preference rows {prompt, image (PNG bytes), chosen, rejected}."""
    import io

    rng = random.Random(seed)
    out = []
    model.eval()
    for r in rows:
        rej = bdhs_rejected(model, processor, r["prompt"], r["image"], r["answer"], rng, **kw)
        buf = io.BytesIO()
        r["image"].save(buf, format="PNG")
        out.append({"prompt": r["prompt"], "image": buf.getvalue(), "chosen": r["answer"], "rejected": rej})
    return out
