"""Text preference data: five schemas, validation, tokenisation and named batches.

Schemas (TRL's column names where TRL has them):
  pairs      prompt, chosen, rejected                       pairwise + token-level losses
  joint      prompt_chosen, chosen, prompt_rejected, rejected   DOVE (each side its own prompt)
  binary     prompt, completion, label (bool / 0 / 1)       KTO, BCO, APO (unpaired)
  ranked     prompt, completions [K], scores [K]            LiPO, PRO (higher score = better)
  negatives  prompt, rejected, samples [K]                  D2O

Batches put chosen first, then rejected, along the batch dimension.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from .records import DataError, load_table, rename_columns, require_columns

Tensor = torch.Tensor

FORMAT_COLUMNS = {
    "pairs": ["prompt", "chosen", "rejected"],
    "joint": ["prompt_chosen", "chosen", "prompt_rejected", "rejected"],
    "binary": ["prompt", "completion", "label"],
    "ranked": ["prompt", "completions", "scores"],
    "negatives": ["prompt", "rejected", "samples"],
}


def format_for_loss(fn) -> str:
    """The data schema a registered loss needs."""
    if getattr(fn, "data_format", "pairs") == "joint":
        return "joint"
    return {"pairwise": "pairs", "token": "pairs", "unpaired": "binary", "listwise": "ranked",
            "negatives": "negatives", "group": "ranked"}[fn.kind]  # online groups: completions + rewards as scores


# ------------------------------------------------------------------ batches


@dataclass
class _Batch:
    def to(self, device):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                setattr(self, f.name, v.to(device))
            elif isinstance(v, _Batch):
                v.to(device)
        return self


@dataclass
class Sequences(_Batch):
    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    pixel_values: Optional[Tensor] = None  # VLMs: one image per row
    token_type_ids: Optional[Tensor] = None  # prefix-LM VLMs (PaliGemma): 0 = prompt (bidirectional), 1 = completion

    def model_inputs(self) -> dict:
        out = {} if self.pixel_values is None else {"pixel_values": self.pixel_values}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids
        return out


@dataclass
class PairBatch(_Batch):
    seqs: Sequences  # [2B, T]: chosen rows then rejected rows
    index: Tensor  # [B] dataset rows
    reward_margin: Optional[Tensor] = None
    prompts: Optional[list] = None  # the prompt text per pair (HyPO samples fresh completions for it)

    def __len__(self):
        return len(self.index)


@dataclass
class BinaryBatch(_Batch):
    seqs: Sequences  # [B, T]
    kl_seqs: Sequences  # [B, T]: prompt i with completion i-1 (KTO's mismatched pairs within this batch)
    labels: Tensor  # [B] bool
    index: Tensor
    prompt_ids: list = None  # token ids per row, to form mismatched pairs across micro-batches (KTO)
    completion_ids: list = None

    def __len__(self):
        return len(self.index)


@dataclass
class ListBatch(_Batch):
    seqs: Sequences  # [B*K, T], row-major by list
    labels: Tensor  # [B, K] scores, higher is better
    list_mask: Tensor  # [B, K] valid entries
    index: Tensor
    old_logps: Optional[Tensor] = None  # [B, K] summed log-probs under the policy that sampled them (online groups)

    def __len__(self):
        return len(self.index)


@dataclass
class NegativesBatch(_Batch):
    seqs: Sequences  # [B*K + B, T]: samples (row-major) then the rejected responses
    sample_mask: Tensor  # [B, K]
    index: Tensor

    def __len__(self):
        return len(self.index)


# ------------------------------------------------------------------ dataset


class TextPreferenceData(torch.utils.data.Dataset):
    """Validated, lazily tokenised preference records of one schema."""

    def __init__(self, source: str, fmt: str, tokenizer, max_length: int = 256, max_prompt_length: int = 128,
                 split: str = "train", columns: dict | None = None, max_examples: int | None = None):
        if fmt not in FORMAT_COLUMNS:
            raise DataError(f"unknown data format {fmt!r}; known: {list(FORMAT_COLUMNS)}")
        if max_prompt_length >= max_length:
            raise DataError(f"max_prompt_length ({max_prompt_length}) must be < max_length ({max_length})")
        ds = rename_columns(load_table(source, split), columns or {}, source)
        require_columns(ds, FORMAT_COLUMNS[fmt], source, f"the {fmt!r} format")
        if max_examples is not None:
            ds = ds.select(range(min(max_examples, len(ds))))
        if len(ds) == 0:
            raise DataError(f"{source}: no rows")
        self.identical = 0
        if fmt in ("pairs", "joint"):  # chosen == rejected carries no preference (like an image tie): drop, count
            pc = ds["prompt_chosen"] if fmt == "joint" else None
            pr = ds["prompt_rejected"] if fmt == "joint" else None
            same = [i for i, (c, r) in enumerate(zip(ds["chosen"], ds["rejected"]))
                    if c == r and (pc is None or pc[i] == pr[i])]
            if same:
                if len(same) == len(ds):
                    raise DataError(f"{source}: every pair has chosen == rejected: nothing to learn from")
                drop = set(same)
                ds = ds.select([i for i in range(len(ds)) if i not in drop])
                self.identical = len(same)
                print(f"{source}: dropped {len(same)} pair(s) whose chosen equals rejected (e.g. row {same[0]})",
                      flush=True)
        self.ds, self.fmt, self.source = ds, fmt, source
        self.tok, self.max_length, self.max_prompt_length = tokenizer, max_length, max_prompt_length
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.has_margin = "reward_margin" in ds.column_names
        self._validate()

    def __len__(self):
        return len(self.ds)

    def _err(self, i, msg):
        raise DataError(f"{self.source}: row {i}: {msg}")

    def _validate(self):
        cols = FORMAT_COLUMNS[self.fmt]
        data = {c: self.ds[c] for c in cols}
        for i in range(len(self.ds)):
            row = {c: data[c][i] for c in cols}
            for c in cols:
                v = row[c]
                if c.startswith("prompt"):
                    if not isinstance(v, str):
                        self._err(i, f"{c!r} must be a string, got {type(v).__name__}")
                elif c in ("chosen", "rejected", "completion"):
                    if not isinstance(v, str) or not v.strip():
                        self._err(i, f"{c!r} is empty" if isinstance(v, str) else f"{c!r} must be a string")
            if self.fmt == "binary":
                lab = row["label"]
                if not (isinstance(lab, bool) or lab in (0, 1)):
                    self._err(i, f"'label' must be true/false (or 0/1), got {lab!r}")
            if self.fmt == "ranked":
                comps, scores = row["completions"], row["scores"]
                if not isinstance(comps, list) or len(comps) < 2:
                    self._err(i, "'completions' must be a list of at least 2 responses")
                if not isinstance(scores, list) or len(scores) != len(comps):
                    n = len(scores) if isinstance(scores, list) else "no"
                    self._err(i, f"'completions' has {len(comps)} items but 'scores' has {n}")
                for j, c in enumerate(comps):
                    if not isinstance(c, str) or not c.strip():
                        self._err(i, f"completions[{j}] is empty")
                for j, s in enumerate(scores):
                    if isinstance(s, bool) or not isinstance(s, (int, float)) or s != s:
                        self._err(i, f"scores[{j}] must be a finite number, got {s!r}")
            if self.fmt == "negatives":
                samples = row["samples"]
                if not isinstance(samples, list) or not samples:
                    self._err(i, "'samples' must be a non-empty list of model samples")
                for j, c in enumerate(samples):
                    if not isinstance(c, str) or not c.strip():
                        self._err(i, f"samples[{j}] is empty")

    def encode(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        return encode_completion(self.tok, prompt, completion, self.max_length, self.max_prompt_length)

    def __getitem__(self, i):
        r = self.ds[int(i)]
        out = {"index": int(i)}
        if self.fmt == "pairs":
            out["seqs"] = [self.encode(r["prompt"], r["chosen"]), self.encode(r["prompt"], r["rejected"])]
            out["prompt"] = r["prompt"]
        elif self.fmt == "joint":
            out["seqs"] = [self.encode(r["prompt_chosen"], r["chosen"]),
                           self.encode(r["prompt_rejected"], r["rejected"])]
        elif self.fmt == "binary":
            ids, mask = self.encode(r["prompt"], r["completion"])
            out["seqs"] = [(ids, mask)]
            n_prompt = mask.index(1)
            out["prompt_ids"], out["completion_ids"] = ids[:n_prompt], ids[n_prompt:]
            out["label"] = bool(r["label"])
        elif self.fmt == "ranked":
            out["seqs"] = [self.encode(r["prompt"], c) for c in r["completions"]]
            out["scores"] = [float(s) for s in r["scores"]]
            if r.get("old_logps") is not None:  # online groups: log-probs under the policy that sampled them
                out["old_logps"] = [float(x) for x in r["old_logps"]]
        elif self.fmt == "negatives":
            out["seqs"] = [self.encode(r["prompt"], c) for c in r["samples"]] + [self.encode(r["prompt"], r["rejected"])]
        if self.has_margin:
            out["reward_margin"] = float(r["reward_margin"])
        return out

    def mismatched(self, prompt_ids: list, completion_ids: list) -> Sequences:
        """KTO's mismatched pairs: prompt j with the completion of row j-1 (cyclic), as TRL does.
        The recipe calls this on *all* rows of an optimiser step (every micro-batch), so the KL
        reference point does not depend on how the step is split."""
        n, out = len(prompt_ids), []
        for j, p in enumerate(prompt_ids):
            c = completion_ids[(j - 1) % n][: self.max_length - len(p)]
            out.append((p + c, [0] * len(p) + [1] * len(c)))
        return pad_sequences(out, self.pad)

    def collate(self, items: list[dict]):
        index = torch.tensor([it["index"] for it in items])
        if self.fmt in ("pairs", "joint"):
            seqs = pad_sequences([it["seqs"][0] for it in items] + [it["seqs"][1] for it in items], self.pad)
            margin = torch.tensor([it["reward_margin"] for it in items]) if self.has_margin else None
            return PairBatch(seqs, index, margin, [it.get("prompt") for it in items])
        if self.fmt == "binary":
            seqs = pad_sequences([it["seqs"][0] for it in items], self.pad)
            p_ids, c_ids = [it["prompt_ids"] for it in items], [it["completion_ids"] for it in items]
            return BinaryBatch(seqs, self.mismatched(p_ids, c_ids), torch.tensor([it["label"] for it in items]), index,
                               p_ids, c_ids)
        if self.fmt == "ranked":
            k = max(len(it["seqs"]) for it in items)
            flat, labels, mask = [], torch.zeros(len(items), k), torch.zeros(len(items), k, dtype=torch.bool)
            old = torch.zeros(len(items), k) if all("old_logps" in it for it in items) else None
            for b, it in enumerate(items):
                m = len(it["seqs"])
                flat += it["seqs"] + [it["seqs"][0]] * (k - m)  # padding slots repeat a real row, masked out
                labels[b, :m] = torch.tensor(it["scores"])
                mask[b, :m] = True
                if old is not None:
                    old[b, :m] = torch.tensor(it["old_logps"])
            return ListBatch(pad_sequences(flat, self.pad), labels, mask, index, old)
        if self.fmt == "negatives":
            k = max(len(it["seqs"]) - 1 for it in items)
            flat, mask = [], torch.zeros(len(items), k, dtype=torch.bool)
            for b, it in enumerate(items):
                s = it["seqs"][:-1]
                flat += s + [s[0]] * (k - len(s))
                mask[b, : len(s)] = True
            flat += [it["seqs"][-1] for it in items]
            return NegativesBatch(pad_sequences(flat, self.pad), mask, index)
        raise AssertionError(self.fmt)


def encode_completion(tok, prompt: str, completion: str, max_length: int, max_prompt_length: int):
    """(ids, completion mask): prompt ids (left-truncated to max_prompt_length) + completion ids + EOS
    (right-truncated to max_length)."""
    p = tok(prompt, add_special_tokens=False)["input_ids"][-max_prompt_length:] if prompt else []
    c = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    c = c[: max_length - len(p)]
    return p + c, [0] * len(p) + [1] * len(c)


def pad_sequences(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> Sequences:
    """Right-pad (ids, completion_mask) pairs into a ``Sequences`` batch."""
    t = max(len(ids) for ids, _ in seqs)
    n = len(seqs)
    input_ids = torch.full((n, t), pad_id, dtype=torch.long)
    attn = torch.zeros((n, t), dtype=torch.long)
    comp = torch.zeros((n, t), dtype=torch.long)
    for i, (ids, m) in enumerate(seqs):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attn[i, : len(ids)] = 1
        comp[i, : len(m)] = torch.tensor(m)
    return Sequences(input_ids, attn, comp)
