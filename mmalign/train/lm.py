"""Recipe ``lm``: preference training of a causal LM with any loss of the core.

The loss's declared ``kind`` decides the data schema and which scores are computed; the recipe never
branches on a loss *name*. The same scoring code serves VLMs and captioners (``mmalign.models.lm``).
"""
from __future__ import annotations

from typing import Callable

import torch

from mmalign.config import ConfigError
from mmalign.data.prompts import load_prompts
from mmalign.data.records import load_table
from mmalign.data.text import (
    BinaryBatch,
    ListBatch,
    NegativesBatch,
    PairBatch,
    TextPreferenceData,
    encode_completion,
    format_for_loss,
    pad_sequences,
)
from mmalign.losses import LOSSES, RunningMoments, activation_mask, kto_kl, token_kl
from mmalign.models.lm import (TokenLogps, build_causal_lm, completion_logps, decide_gradient_checkpointing,
                               enable_gradient_checkpointing, sample_completions)
from mmalign.train.checkpoint import sharded_engine
from mmalign.train.reference import Reference, resolve_kind
from mmalign.rewards.spec import load_function, parse_reward_spec
from mmalign.rewards.transform import reference_rewards, transformed_reward

from .guard import Guard
from .loop import StepOutput
from .online import CompletionRounds, OnlineRounds, best_worst_pairs
from .recipe import RecipeBase, run_recipe
from .sections import LMConfig

Tensor = torch.Tensor


class LMRecipe(RecipeBase):
    def __init__(self, cfg: LMConfig, accelerator, model=None, tokenizer=None):
        self.cfg, self.acc = cfg, accelerator
        self.loss_fn, self.hp = cfg.loss.fn, dict(cfg.loss.params)
        if model is None:
            model, tokenizer = self.build_model(cfg)
        elif cfg.model.gradient_checkpointing:  # a caller's model gets the config's checkpointing too
            enable_gradient_checkpointing(model)
        if cfg.model.gradient_checkpointing == "auto" and not sharded_engine(accelerator):  # on until decided
            decide_gradient_checkpointing(model, accelerator.print)
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
        if cfg.online is not None and "online_samples" not in self.loss_fn.uses:  # HyPO samples inside its steps
            self.online = self.online_rounds()

    def online_rounds(self) -> OnlineRounds:
        """On-policy rounds: K completions per prompt from the current policy, judged by ``online.reward`` (each
        reward term log-sigmoid-transformed against round 0's per-prompt quantile with ``reward_transform``)."""
        cfg, o, d = self.cfg, self.cfg.online, self.cfg.data
        prompts = online_prompts(cfg)
        rewards = text_rewards(o.reward)
        plain = summed(rewards)
        judge = lambda p, ctx, y: plain(p, y)  # noqa: E731
        if o.reward_transform:  # r_ref(x) per reward from the base policy's samples, then sum_m log sigmoid(r_m - r_ref,m)
            if any(w != 1.0 for w, _ in rewards):
                raise ConfigError("online.reward: weights are not defined with online.reward_transform (the transform "
                                  "sums log-sigmoids of the plain rewards)")
            base = sample_completions(self.policy, self.tokenizer, prompts, o.samples, o.max_new_tokens, o.temperature,
                                      seed=cfg.train.seed * 1000, max_prompt_length=d.max_prompt_length)
            each = lambda p, y: [float(r(p, y)) for _, r in rewards]  # noqa: E731
            ref = {p: reference_rewards(torch.tensor([[each(p, y) for y in ys]]), o.reference_quantile)[0]
                   for p, ys in zip(prompts, base)}
            judge = lambda p, ctx, y: float(transformed_reward(torch.tensor([each(p, y)]), ref[p])[0])  # noqa: E731

        def generate(ps, ctxs, k, seed):
            return sample_completions(self.policy, self.tokenizer, ps, k, o.max_new_tokens, o.temperature, seed,
                                      d.max_prompt_length)

        fmt = format_for_loss(self.loss_fn)
        make_data = lambda path: TextPreferenceData(str(path), fmt, self.tokenizer, d.max_length,  # noqa: E731
                                                    d.max_prompt_length)

        def groups(p, ctx, comps, scores):  # + the sampling policy's log-probs: the KL of a trust region (DisCO)
            rows = group_rows(p, ctx, comps, scores)
            if rows and "group_kl" in self.loss_fn.uses:
                rows[0]["old_logps"] = self._sequence_logps(p, rows[0]["completions"])
            return rows

        source = CompletionRounds(self.acc, self.policy, generate, judge, prompts, [None] * len(prompts), o.samples,
                                  cfg.train.seed, make_data, best_worst_pairs if self.loss_fn.kind == "pairwise" else groups)
        return OnlineRounds(source, o.rounds, o.steps_per_round, cfg.train.batch_size * self.acc.num_processes,
                            cfg.train.output_dir, self.acc, Guard(patience=0))

    def build_model(self, cfg):
        return build_causal_lm(cfg.model)

    def build_data(self, cfg, tokenizer):
        fmt = format_for_loss(self.loss_fn)
        d = cfg.data
        if d.train is None:  # online rounds bring their own data
            return None, None
        train = TextPreferenceData(d.train, fmt, tokenizer, d.max_length, d.max_prompt_length, d.split, d.columns)
        ev = (TextPreferenceData(d.eval, fmt, tokenizer, d.max_length, d.max_prompt_length, d.eval_split, d.columns,
                                 d.max_eval_examples) if d.eval else None)
        return train, ev

    # ------------------------------------------------------------------ bookkeeping

    def describe(self) -> str:
        n = sum(p.numel() for p in self.policy.parameters())
        t = sum(p.numel() for p in self.policy.parameters() if p.requires_grad)
        rows = len(self.train_data) if self.train_data is not None else 0
        same = getattr(self.train_data, "identical", 0)
        return (f"lm/{self.cfg.loss.name} | {type(self.policy).__name__} {n / 1e6:.2f}M params "
                f"({t / 1e6:.3f}M trainable) | reference {self.reference.kind} | {rows} rows"
                + (f" ({same} with chosen == rejected dropped)" if same else ""))

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
        if kind in ("listwise", "group"):
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
        """Reference scores, then the policy's, then the loss through the scorer of the loss's ``kind``
        (``SCORERS``): the recipe never branches on a loss name."""
        kind = self.loss_fn.kind
        if kind not in self.SCORERS:
            raise ValueError(f"unsupported loss kind {kind!r}")
        want = self._want()
        # reference first: its full-vocabulary logits are freed before the policy's (kept for backward) exist,
        # so the peak holds one [2B, T, V] logits tensor, not two (TRL 1.16 runs the policy first)
        ref_lp, ref_tab = self._ref(batch, split, want)
        pol = self._logps(self.model, batch.seqs, **want)
        if ref_tab is None and ref_lp is not None and kind != "token":
            ref_tab = self._reference_scores(ref_lp, batch)
        extras = {}
        if "running" in self.loss_fn.uses:  # train: read delta and stage rewards; eval: read delta only
            extras = {"running": self.running} if split == "train" else {"shift": self.running.mean}
        loss, m = self.SCORERS[kind](self, batch, pol, ref_lp, ref_tab, extras, step, split)
        return StepOutput(loss, m)

    def _pairwise(self, batch, pol, ref_lp, ref_tab, extras, step, split):
        assert isinstance(batch, PairBatch)
        fn = self.loss_fn
        pc, pr = pol.sum().chunk(2)
        rc, rr = (ref_tab["chosen"], ref_tab["rejected"]) if ref_tab else (None, None)
        if "lengths" in fn.uses:
            extras["chosen_lengths"], extras["rejected_lengths"] = pol.lengths().chunk(2)
        if "reward_margin" in fn.uses:
            if batch.reward_margin is None:
                raise ValueError(f"loss {self.cfg.loss.name!r} needs a 'reward_margin' column in the data")
            extras["reward_margin"] = batch.reward_margin
        if "online_samples" in fn.uses and split == "train":
            extras.update(self._online_samples(batch, step))
        return fn(pc, pr, rc, rr, **self.hp, **extras)

    def _token(self, batch, pol, ref_lp, ref_tab, extras, step, split):
        fn, hp = self.loss_fn, self.hp
        t_c, t_r = pol.logps.chunk(2)
        m_c, m_r = pol.mask.chunk(2)
        if ref_tab is not None:  # precomputed LD-DPO: reference already reduced
            pc, pr = fn.sequence_scores(t_c, t_r, m_c, m_r, hp.get("alpha", 0.5))
            return LOSSES["dpo"](pc, pr, ref_tab["chosen"], ref_tab["rejected"], beta=hp.get("beta", 0.1),
                                 label_smoothing=hp.get("label_smoothing", 0.0))
        r_c, r_r = ref_lp.logps.chunk(2)
        if {"token_weights", "token_kl"} & set(fn.uses):
            extras.update(self._sparse_inputs(pol, ref_lp))
        return fn(t_c, t_r, r_c, r_r, m_c, m_r, **hp, **extras)

    def _unpaired(self, batch, pol, ref_lp, ref_tab, extras, step, split):
        assert isinstance(batch, BinaryBatch)
        if "kl" in self.loss_fn.uses:
            if split == "train" and self.step_kl is not None:
                extras["kl"] = self.step_kl
            else:  # evaluation: mismatched pairs within the evaluation batch
                with torch.no_grad():
                    pk = self._logps(self.model, batch.kl_seqs).sum()
                    with self.reference.context() as ref:
                        rk = self._logps(ref, batch.kl_seqs).sum()
                extras["kl"] = kto_kl(pk, rk, gather=self.acc.gather if self.acc.num_processes > 1 else None)
        return self.loss_fn(pol.sum(), ref_tab["score"] if ref_tab else None, batch.labels, **self.hp, **extras)

    def _listwise(self, batch, pol, ref_lp, ref_tab, extras, step, split):
        """listwise, and group (K on-policy samples per prompt, rewards as labels)."""
        assert isinstance(batch, ListBatch)
        fn, b = self.loss_fn, len(batch)
        s = (pol.mean() if not fn.needs_reference and "list_lengths" not in fn.uses else pol.sum()).view(b, -1)
        if "list_lengths" in fn.uses:
            extras["lengths"] = pol.lengths().view(b, -1)
        if "group_kl" in fn.uses and batch.old_logps is not None:  # DisCO's trust region to the sampling policy
            m_ = batch.list_mask.to(pol.logps.dtype)
            extras["kl"] = ((batch.old_logps - pol.sum().view(b, -1)) * m_).sum() / \
                (pol.lengths().view(b, -1) * m_).sum().clamp(min=1)
        return fn(s, ref_tab["list"] if ref_tab else None, batch.labels, mask=batch.list_mask, **self.hp, **extras)

    def _negatives(self, batch, pol, ref_lp, ref_tab, extras, step, split):
        assert isinstance(batch, NegativesBatch)
        b, k = batch.sample_mask.shape
        s = pol.sum()
        return self.loss_fn(s[: b * k].view(b, k), ref_tab["samples"], s[b * k:], ref_tab["rejected"],
                            sample_mask=batch.sample_mask, **self.hp)

    SCORERS = {"pairwise": _pairwise, "token": _token, "unpaired": _unpaired, "listwise": _listwise,
               "group": _listwise, "negatives": _negatives}
    """loss kind -> the method that turns the policy's and reference's scores into that kind's loss inputs"""

    def _online_samples(self, batch, step: int) -> dict:
        """HyPO: K fresh samples of each pair's prompt from the current policy, scored by policy (with its
        graph) and reference -- the on-policy estimate of KL(pi || pi_ref)."""
        o = self.cfg.online
        groups = sample_completions(self.policy, self.tokenizer, batch.prompts, o.samples, o.max_new_tokens,
                                    o.temperature, seed=self.cfg.train.seed * 1_000_003 + step * 7_919,
                                    max_prompt_length=self.cfg.data.max_prompt_length)
        data = self.train_data
        seqs = pad_sequences([data.encode(p, c) for p, cs in zip(batch.prompts, groups) for c in cs], data.pad)
        seqs.to(self.acc.device)
        pol = self._logps(self.model, seqs).sum().view(len(batch), -1)
        with self.reference.context() as ref:
            r = self._logps(ref, seqs).sum().view(len(batch), -1)
        return {"sample_logps": pol, "sample_ref_logps": r}

    @torch.no_grad()
    def _sequence_logps(self, prompt: str, completions: list[str]) -> list[float]:
        """Summed completion log-probs of ``completions`` under the current policy, encoded as the data encodes them."""
        d = self.cfg.data
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        seqs = pad_sequences([encode_completion(self.tokenizer, prompt, c, d.max_length, d.max_prompt_length)
                              for c in completions], pad)
        seqs.to(self.acc.device)
        return self._logps(self.policy, seqs).sum().tolist()

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

    def evaluate(self, step: int) -> dict:
        out = self.evaluate_pairs(self.eval_data, step)
        o = self.cfg.online
        if o is not None and o.eval_prompts and self.acc.is_main_process:  # the reward itself, on held-out prompts
            reward = summed(text_rewards(o.reward))
            ps = load_prompts(o.eval_prompts)
            groups = sample_completions(self.policy, self.tokenizer, ps, o.eval_samples, o.max_new_tokens,
                                        o.temperature, seed=12_345, max_prompt_length=self.cfg.data.max_prompt_length)
            out["reward"] = sum(reward(p, y) for p, ys in zip(ps, groups) for y in ys) / (len(ps) * o.eval_samples)
        return out

    def export(self, out_dir, card: dict | None = None):
        if self.acc.is_main_process:
            self.policy.save_pretrained(out_dir)
            self.tokenizer.save_pretrained(out_dir)


def online_prompts(cfg: LMConfig) -> list[str]:
    """The prompts of on-policy rounds: ``online.prompts`` (a file) or the distinct prompts of data.train."""
    o = cfg.online
    if o.prompts:
        ps = load_prompts(o.prompts)
    else:
        ps = list(dict.fromkeys(load_table(cfg.data.train, cfg.data.split)["prompt"]))
    return ps[: o.max_prompts]


def text_rewards(spec: str, key: str = "online.reward") -> list[tuple[float, Callable]]:
    """``"py:mod:f + 0.5*py:mod:g"`` -> [(1.0, f), (0.5, g)] (text rewards are Python functions f(prompt, completion))."""
    return [(t.weight, load_function(t.name, key)) for t in parse_reward_spec(spec, key)]


def summed(rewards: list[tuple[float, Callable]]):
    return lambda p, y: float(sum(w * r(p, y) for w, r in rewards))


def group_rows(prompt, context, completions, scores) -> list[dict]:
    """A whole group (DisCO, f-DPG) as a ranked-format row; empty completions are left out."""
    keep = [(c, s) for c, s in zip(completions, scores) if c.strip()]
    if len(keep) < 2:
        return []
    return [{"prompt": prompt, "completions": [c for c, _ in keep], "scores": [float(s) for _, s in keep]}]


def run(cfg: LMConfig, accelerator=None):
    """Train (offline, or in online rounds when ``online`` is set) and export ``final``."""
    return run_recipe(LMRecipe, cfg, accelerator)
