"""Recipe ``vlm``: DPO-family training of LLaVA-style VLMs.

The LM recipe unchanged, with two differences: the model/processor come from ``mmalign.vl.models``
and batches carry ``pixel_values`` (one image per row, the same for chosen and rejected). ``online``
runs rounds of: sample ``samples`` answers per (prompt, image) with the current policy, score them with
a judge, pair best vs worst (reward margin kept for ``mm_dpo``), train ``steps_per_round`` steps.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from mmalign.models.lm import add_lora, set_dropout
from mmalign.vl.data import VisionPreferenceData
from mmalign.vl.models import generate, load_vlm, tiny_vlm

from .configs import VLMConfig
from .lm import LMRecipe
from .loop import eval_summary, make_accelerator, train


class VLMRecipe(LMRecipe):
    def build_model(self, cfg: VLMConfig):
        m = cfg.model
        model, proc = tiny_vlm(**m.tiny) if m.tiny is not None else load_vlm(m.name_or_path, getattr(torch, m.dtype))
        if m.freeze_vision:
            for name, p in model.named_parameters():
                if "vision_tower" in name:
                    p.requires_grad_(False)
        if m.dropout is not None:
            set_dropout(model, m.dropout)
        if m.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if m.lora is not None:
            lo = m.lora
            if lo.target_modules is None:
                lo.target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
            model = add_lora(model, lo)
        self.processor = proc
        return model, proc

    def build_data(self, cfg: VLMConfig, processor):
        d = cfg.data
        if d.train is None:
            return None, None
        train_ = VisionPreferenceData(d.train, processor, d.max_length, d.max_prompt_length, d.split, d.columns,
                                      image_column=d.image_column, allow_outside_root=d.allow_outside_root)
        ev = (VisionPreferenceData(d.eval, processor, d.max_length, d.max_prompt_length, d.eval_split, d.columns,
                                   d.max_eval_examples, d.image_column, d.allow_outside_root) if d.eval else None)
        return train_, ev

    def evaluate(self, step: int, data=None, split: str = "eval") -> dict:
        out = super().evaluate(step, data, split)
        if self.cfg.eval_qa and data is None and self.acc.is_main_process:
            from mmalign.demo.qa import evaluate_qa

            qa = evaluate_qa(self.acc.unwrap_model(self.policy), self.processor, self.cfg.eval_qa)
            self.last_answers = qa.pop("examples")
            out.update(qa)
        return out

    def describe(self) -> str:
        n = sum(p.numel() for p in self.policy.parameters())
        t = sum(p.numel() for p in self.policy.parameters() if p.requires_grad)
        rows = len(self.train_data) if self.train_data is not None else 0
        return (f"vlm/{self.cfg.loss.name} | {type(self.policy).__name__} {n / 1e6:.2f}M params "
                f"({t / 1e6:.3f}M trainable) | reference {self.reference.kind} | {rows} pairs")


def online_prompts(cfg: VLMConfig):
    """(prompts, images, question kinds) for on-policy sampling."""
    o = cfg.online
    if o.shapes_world:
        from mmalign.demo.qa import QUESTIONS
        from mmalign.demo.world import make_dataset

        data = make_dataset(o.shapes_world, seed=cfg.train.seed + 7)
        rows = [(q, im, kind) for im, _, _ in data for kind, q in QUESTIONS.items()]
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
    from mmalign.data.records import load_table
    from mmalign.data.images import open_image

    t = load_table(o.prompts)
    return list(t["prompt"]), [open_image(x) for x in t["image"]], [None] * len(t)


def make_judge(cfg: VLMConfig, device):
    o = cfg.online
    if o.judge == "shapes-qa":
        from mmalign.demo.qa import judge

        return lambda im, kind, text: judge(im, kind or "describe", text)["score"]
    from mmalign.rewards import load_reward

    rw = load_reward(o.judge, device=device)
    return lambda im, kind, text: float(rw.score([im], [text])[0])


def online_pairs(recipe: VLMRecipe, cfg: VLMConfig, round_: int, judge) -> list[dict]:
    """Sample ``samples`` answers per prompt with the current policy; pair the best with the worst."""
    import io

    o = cfg.online
    prompts, images, kinds = online_prompts(cfg)
    model = recipe.policy
    model.eval()
    rows = []
    for p, im, kind in zip(prompts, images, kinds):
        answers = generate(model, recipe.processor, [p] * o.samples, [im] * o.samples, o.max_new_tokens,
                           do_sample=True, temperature=o.temperature,
                           generator_seed=cfg.train.seed * 1000 + round_ * 100_000 + len(rows) * 10)
        scores = [judge(im, kind, a) for a in answers]
        hi, lo = int(np.argmax(scores)), int(np.argmin(scores))
        if scores[hi] > scores[lo] and answers[hi].strip() and answers[lo].strip():
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            rows.append({"prompt": p, "image": buf.getvalue(), "chosen": answers[hi], "rejected": answers[lo],
                         "reward_margin": scores[hi] - scores[lo]})
    model.train()
    return rows


def run(cfg: VLMConfig, accelerator=None):
    from accelerate.utils import set_seed

    from mmalign.config import to_dict

    acc = accelerator or make_accelerator(cfg.train)
    set_seed(cfg.train.seed)
    recipe = VLMRecipe(cfg, acc)
    if cfg.online is None:
        result = train(recipe, cfg.train, acc, config=to_dict(cfg))
    else:
        import dataclasses

        import datasets

        judge = make_judge(cfg, acc.device)
        out = Path(cfg.train.output_dir)
        result, log, evals, done = None, [], [], 0
        if cfg.train.eval_every:
            evals.append({"step": 0, **{f"eval/{k}": v for k, v in recipe.evaluate(0).items()}})
        for r in range(cfg.online.rounds):
            rows = online_pairs(recipe, cfg, r, judge)
            if len(rows) < cfg.train.batch_size:
                if result is None:
                    raise RuntimeError(
                        f"online round 0: only {len(rows)} informative pairs (the judge scored all sampled answers "
                        f"of a prompt equally); need at least train.batch_size={cfg.train.batch_size}. Raise "
                        "online.samples / online.temperature or start from a model that answers the questions.")
                print(f"online round {r}: only {len(rows)} informative pairs; stopping")
                break
            path = out / f"online_round{r}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_list(rows).to_parquet(str(path))
            recipe.train_data = VisionPreferenceData(str(path), recipe.processor, cfg.data.max_length,
                                                     cfg.data.max_prompt_length, image_column="image")
            recipe.model = recipe.policy
            tc = dataclasses.replace(cfg.train, max_steps=cfg.online.steps_per_round,
                                     output_dir=str(out / f"round{r}"), eval_every=0)
            result = train(recipe, tc, acc, config=to_dict(cfg))
            done += result.step
            log.append({"round": r, "pairs": len(rows), "mean_margin": float(np.mean([x["reward_margin"] for x in rows]))})
            print(f"online round {r}: {len(rows)} pairs, mean judge margin {log[-1]['mean_margin']:.3f}", flush=True)
            if cfg.train.eval_every:  # evaluation after every round, at the cumulative step
                evals.append({"step": done, **{f"eval/{k}": v for k, v in recipe.evaluate(done).items()}})
                log[-1].update({k: v for k, v in evals[-1].items() if k != "step"})
        (out / "online.json").write_text(json.dumps(log))
        result.online, result.eval_history, result.step = log, evals, done
    recipe.export(f"{cfg.train.output_dir}/final")
    eval_summary(result, acc)
    result.recipe = recipe
    return result
