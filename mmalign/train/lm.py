"""Recipe ``lm``: preference training of a causal LM with any loss of the core.

The loss's declared ``kind`` decides the data schema and which scores are computed; the recipe never
branches on a loss *name*. The same scoring code serves VLMs and captioners (``mmalign.models.lm``).
"""
from __future__ import annotations

import torch

from mmalign.data.text import (
    BinaryBatch,
    ListBatch,
    NegativesBatch,
    PairBatch,
    TextPreferenceData,
    format_for_loss,
)
from mmalign.losses import LOSSES, RunningMoments, activation_mask, kto_kl, token_kl
from mmalign.models.lm import TokenLogps, build_causal_lm, completion_logps
from mmalign.models.reference import Reference, resolve_kind

from .loop import StepOutput
from .recipe import RecipeBase, run_recipe
from .sections import LMConfig

Tensor = torch.Tensor


class LMRecipe(RecipeBase):
    def __init__(self, cfg: LMConfig, accelerator, model=None, tokenizer=None):
        self.cfg, self.acc = cfg, accelerator
        self.loss_fn, self.hp = cfg.loss.fn, dict(cfg.loss.params)
        if model is None:
            model, tokenizer = self.build_model(cfg)
        self.model, self.tokenizer = model, tokenizer
        self.policy = model  # unwrapped handle (accelerate may wrap self.model in DDP)
        self.train_data, self.eval_data = self.build_data(cfg, tokenizer)
        kind = resolve_kind(cfg.model.reference, cfg.model.lora is not None, self.loss_fn.needs_reference)
        self.reference = Reference(kind, model)
        self.running = RunningMoments() if "running" in self.loss_fn.uses else None
        self.step_kl: Tensor | None = None  # KTO: z0 of the current optimiser step (``begin_step``)
        if kind == "precomputed":
            if not self.loss_fn.precomputable:
                raise ValueError(f"model.reference=precomputed is not supported for loss {cfg.loss.name!r} "
                                 "(its reference terms depend on the batch or on full-vocabulary logits); "
                                 "use copy or peft")
            self.reference.store("train", self.precompute(self.train_data))
            if self.eval_data is not None:
                self.reference.store("eval", self.precompute(self.eval_data))

    def build_model(self, cfg):
        return build_causal_lm(cfg.model)

    def build_data(self, cfg, tokenizer):
        fmt = format_for_loss(self.loss_fn)
        d = cfg.data
        train = TextPreferenceData(d.train, fmt, tokenizer, d.max_length, d.max_prompt_length, d.split, d.columns)
        ev = (TextPreferenceData(d.eval, fmt, tokenizer, d.max_length, d.max_prompt_length, d.eval_split, d.columns,
                                 d.max_eval_examples) if d.eval else None)
        return train, ev

    # ------------------------------------------------------------------ bookkeeping

    def describe(self) -> str:
        n = sum(p.numel() for p in self.policy.parameters())
        t = sum(p.numel() for p in self.policy.parameters() if p.requires_grad)
        return (f"lm/{self.cfg.loss.name} | {type(self.policy).__name__} {n / 1e6:.2f}M params "
                f"({t / 1e6:.3f}M trainable) | reference {self.reference.kind} | {len(self.train_data)} rows")

    def begin_step(self, micro_batches: list):
        """KTO: the reference point z0 from mismatched pairs over *all* rows of this optimiser step (every
        micro-batch; averaged over processes), so accumulation does not change it."""
        if "kl" not in self.loss_fn.uses:
            return
        p_ids = [p for b in micro_batches for p in b.prompt_ids]
        c_ids = [c for b in micro_batches for c in b.completion_ids]
        if len(p_ids) < 2:
            raise ValueError(f"loss {self.cfg.loss.name!r} estimates its KL reference point from mismatched "
                             "(prompt, completion) pairs and needs >= 2 rows per process per optimiser step; "
                             "raise train.batch_size or train.grad_accum")
        chunk = max(len(b) for b in micro_batches)
        pol, ref = [], []
        seqs = self.train_data.mismatched(p_ids, c_ids)
        with torch.no_grad():
            for lo in range(0, len(p_ids), chunk):
                sub = type(seqs)(seqs.input_ids[lo: lo + chunk], seqs.attention_mask[lo: lo + chunk],
                                 seqs.completion_mask[lo: lo + chunk]).to(self.acc.device)
                pol.append(self._logps(self.model, sub).sum())
                with self.reference.context() as r:
                    ref.append(self._logps(r, sub).sum())
        gather = self.acc.gather if self.acc.num_processes > 1 else None
        self.step_kl = kto_kl(torch.cat(pol), torch.cat(ref), gather=gather)

    # ------------------------------------------------------------------ scoring

    def _want(self):
        uses = self.loss_fn.uses
        return {"hidden": "token_weights" in uses and self.cfg.token_weights != "mask",
                "keep_logits": "token_kl" in uses and self.cfg.token_kl}

    def _logps(self, model, seqs, **kw) -> TokenLogps:
        return completion_logps(model, seqs.input_ids, seqs.attention_mask, seqs.completion_mask,
                                **seqs.model_inputs(), **kw)

    @torch.no_grad()
    def precompute(self, data: TextPreferenceData, batch_size: int = 16) -> dict[str, Tensor]:
        """Reference scores for every row, computed once with the initial policy."""
        tables: dict[str, list] = {}
        for lo in range(0, len(data), batch_size):
            batch = data.collate([data[i] for i in range(lo, min(len(data), lo + batch_size))])
            batch.to(self.acc.device)
            with self.reference.context() as ref:
                lp = self._logps(ref, batch.seqs)
            for k, v in self._reference_scores(lp, batch).items():
                tables.setdefault(k, []).append(v.cpu())
        return {k: torch.cat(v) for k, v in tables.items()}

    def _reference_scores(self, lp: TokenLogps, batch) -> dict[str, Tensor]:
        """Row-indexed reference scores in the form the loss consumes (``precomputed`` stores these)."""
        kind = self.loss_fn.kind
        if kind == "pairwise":
            c, r = lp.sum().chunk(2)
            return {"chosen": c, "rejected": r}
        if kind == "token":  # LD-DPO: the reduction (with its alpha) is part of the reference score
            t_c, t_r = lp.logps.chunk(2)
            m_c, m_r = lp.mask.chunk(2)
            c, r = self.loss_fn.sequence_scores(t_c, t_r, m_c, m_r, self.hp.get("alpha", 0.5))
            return {"chosen": c, "rejected": r}
        if kind == "unpaired":
            return {"score": lp.sum()}
        if kind == "listwise":
            return {"list": lp.sum().view(len(batch), -1)}
        if kind == "negatives":
            k = batch.sample_mask.shape[1]
            s = lp.sum()
            return {"samples": s[: len(batch) * k].view(len(batch), k), "rejected": s[len(batch) * k:]}
        raise ValueError(kind)

    def _ref(self, batch, split: str, want: dict) -> tuple[TokenLogps | None, dict[str, Tensor] | None]:
        if self.reference.kind == "none":
            return None, None
        if self.reference.kind == "precomputed":
            return None, self.reference.lookup(split, batch.index.to(self.acc.device))
        with self.reference.context() as ref:
            return self._logps(ref, batch.seqs, **want), None

    def compute(self, batch, step: int = 0, split: str = "train") -> StepOutput:
        fn, kind, hp = self.loss_fn, self.loss_fn.kind, self.hp
        want = self._want()
        pol = self._logps(self.model, batch.seqs, **want)
        ref_lp, ref_tab = self._ref(batch, split, want)
        if ref_tab is None and ref_lp is not None and kind != "token":
            ref_tab = self._reference_scores(ref_lp, batch)
        extras = {}
        if "running" in fn.uses:  # train: read delta and stage rewards; eval: read delta only
            if split == "train":
                extras["running"] = self.running
            else:
                extras["shift"] = self.running.mean

        if kind == "pairwise":
            assert isinstance(batch, PairBatch)
            pc, pr = pol.sum().chunk(2)
            rc, rr = (ref_tab["chosen"], ref_tab["rejected"]) if ref_tab else (None, None)
            if "lengths" in fn.uses:
                extras["chosen_lengths"], extras["rejected_lengths"] = pol.lengths().chunk(2)
            if "reward_margin" in fn.uses:
                if batch.reward_margin is None:
                    raise ValueError(f"loss {self.cfg.loss.name!r} needs a 'reward_margin' column in the data")
                extras["reward_margin"] = batch.reward_margin
            loss, m = fn(pc, pr, rc, rr, **hp, **extras)
        elif kind == "token":
            t_c, t_r = pol.logps.chunk(2)
            m_c, m_r = pol.mask.chunk(2)
            if ref_tab is not None:  # precomputed LD-DPO: reference already reduced
                pc, pr = fn.sequence_scores(t_c, t_r, m_c, m_r, hp.get("alpha", 0.5))

                loss, m = LOSSES["dpo"](pc, pr, ref_tab["chosen"], ref_tab["rejected"], beta=hp.get("beta", 0.1),
                                        label_smoothing=hp.get("label_smoothing", 0.0))
            else:
                r_c, r_r = ref_lp.logps.chunk(2)
                if {"token_weights", "token_kl"} & set(fn.uses):
                    extras.update(self._sparse_inputs(pol, ref_lp))
                loss, m = fn(t_c, t_r, r_c, r_r, m_c, m_r, **hp, **extras)
        elif kind == "unpaired":
            assert isinstance(batch, BinaryBatch)
            pol_s = pol.sum()
            ref_s = ref_tab["score"] if ref_tab else None
            if "kl" in fn.uses:
                if split == "train" and self.step_kl is not None:
                    extras["kl"] = self.step_kl
                else:  # evaluation: mismatched pairs within the evaluation batch
                    with torch.no_grad():
                        pk = self._logps(self.model, batch.kl_seqs).sum()
                        with self.reference.context() as ref:
                            rk = self._logps(ref, batch.kl_seqs).sum()
                    extras["kl"] = kto_kl(pk, rk, gather=self.acc.gather if self.acc.num_processes > 1 else None)
            loss, m = fn(pol_s, ref_s, batch.labels, **hp, **extras)
        elif kind == "listwise":
            assert isinstance(batch, ListBatch)
            b = len(batch)
            s = (pol.mean() if not fn.needs_reference else pol.sum()).view(b, -1)
            r = ref_tab["list"] if ref_tab else None
            loss, m = fn(s, r, batch.labels, mask=batch.list_mask, **hp)
        elif kind == "negatives":
            assert isinstance(batch, NegativesBatch)
            b, k = batch.sample_mask.shape
            s = pol.sum()
            loss, m = fn(s[: b * k].view(b, k), ref_tab["samples"], s[b * k:], ref_tab["rejected"],
                         sample_mask=batch.sample_mask, **hp)
        else:
            raise ValueError(f"unsupported loss kind {kind!r}")
        return StepOutput(loss, m)

    def _sparse_inputs(self, pol: TokenLogps, ref: TokenLogps) -> dict:
        out = {}
        mode = self.cfg.token_weights
        if mode != "mask":
            w = activation_mask(ref.hidden, ref.mask, mode)
            out["chosen_weights"], out["rejected_weights"] = w.chunk(2)
        if self.cfg.token_kl:
            k = token_kl(pol.logits, ref.logits)
            out["chosen_kl"], out["rejected_kl"] = k.chunk(2)
        return out

    # ------------------------------------------------------------------ evaluation and export

    def export(self, out_dir, card: dict | None = None):
        if self.acc.is_main_process:
            self.policy.save_pretrained(out_dir)
            self.tokenizer.save_pretrained(out_dir)


def run(cfg: LMConfig, accelerator=None):
    return run_recipe(LMRecipe, cfg, accelerator)
