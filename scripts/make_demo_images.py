"""Ship a small folder of generated shapes images for `mmalign score` demos and tests:
assets/demo_images/*.png + metadata.jsonl (file_name, prompt, oracle) from the shipped base model,
deliberately including its mistakes. Also prints toy_clip's agreement with the oracle on them.

    python scripts/make_demo_images.py
"""
import json

import torch

from mmalign.toyworld.world import all_prompts, oracle_score
from mmalign.diffusion.models import load_components
from mmalign.paths import ASSETS


def agreement(scores, oracle, prompts, min_gap=0.1):
    """Share of same-prompt image pairs whose oracle scores differ by > min_gap that the reward orders alike."""
    agree = total = 0
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            if prompts[i] == prompts[j] and abs(oracle[i] - oracle[j]) > min_gap:
                total += 1
                agree += (scores[i] - scores[j]) * (oracle[i] - oracle[j]) > 0
    return agree / max(total, 1), total


def main():
    out = ASSETS / "demo_images"
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_components("sd", str(ASSETS / "models" / "shapes-sd")).pipeline()
    prompts = [p for p in all_prompts() for _ in range(4)]
    gens = [torch.Generator().manual_seed(777 + i) for i in range(len(prompts))]
    images = pipe(prompts, num_inference_steps=20, guidance_scale=3.0, height=32, width=32, generator=gens).images
    rows = []
    for i, (im, p) in enumerate(zip(images, prompts)):
        name = f"gen_{i:03d}.png"
        im.save(out / name)
        rows.append({"file_name": name, "prompt": p, "oracle": round(oracle_score(im, p), 4)})
    (out / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    from mmalign.rewards import load_reward

    s = load_reward("toy_clip", device="cpu").score(images, prompts).tolist()
    acc, n = agreement(s, [r["oracle"] for r in rows], prompts)
    print(f"wrote {len(rows)} images to {out}; toy_clip agrees with the oracle on {acc:.3f} of {n} same-prompt pairs")


if __name__ == "__main__":
    main()
