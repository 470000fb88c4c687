"""Recipe ``vlm``: DPO-family training of LLaVA-style VLMs.

The LM recipe unchanged, with two differences: the model/processor come from ``mmalign.vl.models``
and batches carry ``pixel_values`` (one image per row, the same for chosen and rejected). ``online``
runs rounds of: sample ``samples`` answers per (prompt, image) with the current policy, score them with
a judge, pair best vs worst (reward margin kept for ``mm_dpo``), train ``steps_per_round`` steps.
"""
from __future__ import annotations

import dataclasses

import io
from pathlib import Path

import torch

from mmalign.data.images import open_image
from mmalign.data.records import load_table, table_root
from mmalign.models.lm import add_lora, enable_gradient_checkpointing, set_dropout
from mmalign.rewards import load_reward
from mmalign.rewards.spec import parse_reward_spec
from mmalign.vl.data import VisionPreferenceData
from mmalign.vl.models import generate, load_vlm, tiny_vlm
from mmalign.worlds import get_world

from .guard import Guard
from .lm import LMRecipe
from .online import CompletionRounds, OnlineRounds, best_worst_pairs
from .recipe import run_recipe
from .sections import VLMConfig


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
            enable_gradient_checkpointing(model)
        if m.lora is not None:  # the attention projections by default; the bound config is left as written
            lo = m.lora if m.lora.target_modules is not None else \
                dataclasses.replace(m.lora, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
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

    def online_rounds(self) -> OnlineRounds:
        """Rounds of: ``samples`` answers per (prompt, image) from the current policy, judged by ``online.judge``
        (``world:NAME``: the world's QA judge; ``reward:NAME``: a REWARDS model scoring (image, answer)), best vs
        worst paired with the judge's margin (``mm_dpo``)."""
        cfg, o, d = self.cfg, self.cfg.online, self.cfg.data
        if o.world_images:
            rows = get_world(cfg.world).qa_rows(o.world_images, seed=cfg.train.seed + 7)
            prompts, contexts = [r["prompt"] for r in rows], [(r["image"], r["kind"]) for r in rows]
        else:
            t, root = load_table(o.prompts), table_root(o.prompts)
            prompts = list(t["prompt"])
            contexts = [(open_image(x, root, d.allow_outside_root, f"{o.prompts}: row {i}"), None)
                        for i, x in enumerate(t["image"])]
        (term,) = parse_reward_spec(o.judge, "online.judge")
        if term.kind == "world":
            w = get_world(term.name)
            judge = lambda p, ctx, y: w.judge(ctx[0], ctx[1], y)  # noqa: E731
        else:
            rw = load_reward(term.name, device=self.acc.device)
            judge = lambda p, ctx, y: float(rw.score([ctx[0]], [y])[0])  # noqa: E731

        def sample(ps, ctxs, k, seed):
            return [generate(self.policy, self.processor, [p] * k, [c[0]] * k, o.max_new_tokens, do_sample=True,
                             temperature=o.temperature, generator_seed=seed + 10 * i)
                    for i, (p, c) in enumerate(zip(ps, ctxs))]

        make_data = lambda path: VisionPreferenceData(str(path), self.processor, d.max_length,  # noqa: E731
                                                      d.max_prompt_length, image_column="image")
        pairs = lambda p, c, ys, sc: [{**row, "context": c} for row in best_worst_pairs(p, c, ys, sc)]  # noqa: E731
        source = CompletionRounds(self.acc, self.policy, sample, judge, prompts, contexts, o.samples, cfg.train.seed,
                                  make_data, pairs, _image_rows)
        return OnlineRounds(source, o.rounds, o.steps_per_round, cfg.train.batch_size * self.acc.num_processes,
                            cfg.train.output_dir, self.acc, Guard(patience=0))

    def evaluate(self, step: int) -> dict:
        out = self.evaluate_pairs(self.eval_data, step)
        if self.cfg.eval_qa and self.acc.is_main_process:
            qa = get_world(self.cfg.world).evaluate_vlm(self.acc.unwrap_model(self.policy), self.processor,
                                                        self.cfg.eval_qa)
            self.last_answers = qa.pop("examples")
            out.update(qa)
        return out

    def describe(self) -> str:
        n = sum(p.numel() for p in self.policy.parameters())
        t = sum(p.numel() for p in self.policy.parameters() if p.requires_grad)
        rows = len(self.train_data) if self.train_data is not None else 0
        return (f"vlm/{self.cfg.loss.name} | {type(self.policy).__name__} {n / 1e6:.2f}M params "
                f"({t / 1e6:.3f}M trainable) | reference {self.reference.kind} | {rows} pairs")


def _image_rows(rows: list[dict], path: Path):
    """Round rows with their image (the context) stored as PNG bytes, in the vision-pairs schema."""
    import datasets

    out = []
    for r in rows:
        buf = io.BytesIO()
        r.pop("context")[0].save(buf, format="PNG")
        out.append({**r, "image": buf.getvalue()})
    datasets.Dataset.from_list(out).to_parquet(str(path))


def run(cfg: VLMConfig, accelerator=None):
    """Train (offline pairs, or online rounds judged by ``online.judge``) and export ``final``."""
    return run_recipe(VLMRecipe, cfg, accelerator)
