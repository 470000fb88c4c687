"""Text DPO step time: mmalign's loop vs TRL's DPOTrainer, same model, same data, same batch, same run.

Both train the same randomly initialised GPT-2 (built from a config) against a frozen reference copy
on the shipped toy preference pairs, with AdamW, for the same number of optimiser steps. Two numbers:

  loop   wall time per optimiser step of each trainer's own training loop (``trainer.train()`` vs
         ``mmalign.train.loop.train``), after one warm-up step, including data loading and logging
  core   one forward + backward of the loss on an identical batch (TRL ``_compute_loss`` vs our
         ``LMRecipe.compute``), median over repeats
  memory peak memory of training, each trainer in its own subprocess: CUDA max allocated, or on CPU the
         peak growth of resident memory over the process's size just before ``train()`` (sampled every
         2 ms), so the Python/torch/TRL import footprint, equal-ish for both, does not dilute the ratio

Each is measured twice, with gradient checkpointing off for both and on for both: TRL's ``DPOConfig`` turns
it on by default (``gradient_checkpointing=True``), mmalign's ``model.gradient_checkpointing`` is off by
default, and comparing the two defaults would set recompute against memory. ``--gc off|on`` runs one setting.

    python scripts/bench_lm_dpo.py [--layers 6 --width 384 --batch 8 --steps 30]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = ROOT / "assets/data/toy_prefs/pairs_train.jsonl"


def make_model(tok, layers, width, heads, vocab=None):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab or len(tok), n_layer=layers, n_embd=width, n_head=heads, n_positions=256,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, resid_pdrop=0, embd_pdrop=0,
                     attn_pdrop=0)
    return GPT2LMHeadModel(cfg)


def trl_trainer(model, tok, rows, batch, steps, out, gc: bool):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        conf = DPOConfig(output_dir=out, report_to="none", per_device_train_batch_size=batch, max_steps=steps,
                         learning_rate=1e-4, max_length=128, use_cpu=not torch.cuda.is_available(), bf16=False,
                         beta=0.1, logging_steps=10_000, save_strategy="no", disable_dropout=True,
                         dataloader_num_workers=0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
                         weight_decay=0.0, gradient_checkpointing=gc)
        return DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=conf,
                          train_dataset=Dataset.from_list(rows), processing_class=tok)


def ours(model, tok, batch, steps, out, gc: bool):
    from accelerate import Accelerator

    from mmalign.config import config_from_dict
    from mmalign.train.sections import RECIPES
    from mmalign.train.lm import LMRecipe

    cfg = config_from_dict({
        "recipe": "lm", "model": {"tiny": {"arch": "gpt2"}, "gradient_checkpointing": gc},
        "data": {"train": str(DATA), "max_length": 128, "max_prompt_length": 64},
        "loss": {"name": "dpo", "beta": 0.1},
        "train": {"output_dir": out, "max_steps": steps, "batch_size": batch, "lr": 1e-4, "log_every": 10_000,
                  "progress": False, "report_to": ["jsonl"], "max_grad_norm": 1.0},
    }, RECIPES)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    return LMRecipe(cfg, acc, model=model, tokenizer=tok), cfg


def time_loops(base, tok, rows, batch, steps, tmp, gc: bool):
    """Seconds per optimiser step 2..N of one N-step run of each trainer: the time from the end of step 1 to
    the end of step N over N - 1, read from each loop's own step-end hook (TRL's ``on_step_end`` callback, our
    recipe's ``on_step_end``), so setup and the warm-up step are left out and the figure cannot come out negative (the
    earlier way, an N-step run minus a 1-step run, did on a loaded machine at 3 steps)."""
    from accelerate.state import AcceleratorState, GradientState
    from transformers import TrainerCallback

    from mmalign.train.loop import train

    if steps < 2:
        raise SystemExit("--steps must be at least 2 (step 1 is the warm-up)")
    ends = {"mmalign": [], "trl": []}

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends["trl"].append(time.perf_counter())

    for name in ("mmalign", "trl"):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        m = copy.deepcopy(base)
        if name == "trl":
            tr = trl_trainer(m, tok, rows, batch, steps, f"{tmp}/trl", gc)
            tr.add_callback(StepEnds())
            tr.train()
        else:
            recipe, cfg = ours(m, tok, batch, steps, f"{tmp}/ours", gc)
            recipe_end = recipe.on_step_end  # called after every optimiser step (``on_step`` only at log steps)

            def on_step_end(step, applied=True, _end=recipe_end):
                ends["mmalign"].append(time.perf_counter())
                return _end(step, applied=applied)

            recipe.on_step_end = on_step_end
            train(recipe, cfg.train, recipe.acc)
    if any(len(e) != steps for e in ends.values()):
        raise SystemExit(f"expected {steps} step ends per trainer, got { {k: len(e) for k, e in ends.items()} }")
    return {k: (e[-1] - e[0]) / (steps - 1) for k, e in ends.items()}


def time_core(base, tok, rows, batch, gc: bool, repeats=10):
    """Forward + backward of the loss on one identical batch (TRL's collated batch for both)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    m = copy.deepcopy(base)
    tr = trl_trainer(m, tok, rows, batch, 1, "/tmp/mmalign-bench-core", gc)
    b = tr.data_collator([tr.train_dataset[i] for i in range(batch)])
    recipe, _ = ours(copy.deepcopy(base), tok, batch, 1, "/tmp/mmalign-bench-core-ours", gc)
    tr.model.train()
    recipe.model.train()
    from mmalign.data.text import PairBatch, Sequences

    pb = PairBatch(Sequences(b["input_ids"], b["attention_mask"], b["completion_mask"]), torch.arange(batch))
    res = {"trl": [], "mmalign": []}
    for _ in range(repeats):
        for name in ("trl", "mmalign"):
            t0 = time.perf_counter()
            if name == "trl":
                loss = tr._compute_loss(tr.model, b, False)
                loss.backward()
                tr.model.zero_grad(set_to_none=True)
            else:
                out = recipe.compute(pb)
                out.loss.mean().backward()
                recipe.model.zero_grad(set_to_none=True)
            res[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v[1:]) for k, v in res.items()}


class PeakRSS:
    """Peak resident memory above the size at ``__enter__`` (CPU), or CUDA max allocated, while in the block."""

    def __enter__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = self._rss()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self.done.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        if self.cuda:
            self.mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.done.set()
            self.thread.join()
            self.mb = (max(self.peak, self._rss()) - self.base) / 2**20


def memory_child(name: str, layers: int, width: int, heads: int, batch: int, steps: int, gc: bool,
                 vocab: int | None) -> None:
    """One trainer, one process: print its training peak memory (MB) as ``MEM <mb>``."""
    import tempfile

    from mmalign.models.lm import load_tokenizer
    from mmalign.train.loop import train

    tok = load_tokenizer(None)
    rows = [json.loads(x) for x in open(DATA)][: max(512, batch * (steps + 2))]
    m = make_model(tok, layers, width, heads, vocab)
    with tempfile.TemporaryDirectory() as tmp:
        if name == "trl":
            tr = trl_trainer(m, tok, rows, batch, steps, tmp, gc)
            with PeakRSS() as p:
                tr.train()
        else:
            recipe, cfg = ours(m, tok, batch, steps, tmp, gc)
            with PeakRSS() as p:
                train(recipe, cfg.train, recipe.acc)
    print(f"MEM {p.mb:.1f}", flush=True)


def measure_memory(args, gc: bool) -> dict:
    out = {}
    for name in ("mmalign", "trl"):
        r = subprocess.run([sys.executable, __file__, "--memory-child", name, "--layers", str(args.layers),
                            "--width", str(args.width), "--heads", str(args.heads), "--batch", str(args.batch),
                            "--steps", str(min(args.steps, 10)), "--gc", "on" if gc else "off"]
                           + (["--vocab", str(args.vocab)] if args.vocab else []),
                           capture_output=True, text=True)
        line = [x for x in r.stdout.splitlines() if x.startswith("MEM ")]
        out[name] = float(line[0][4:]) if line else float("nan")
        if not line:
            print(f"memory run of {name} failed:\n{r.stderr[-1500:]}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--gc", choices=["both", "off", "on"], default="both",
                    help="gradient checkpointing, the same setting for both trainers")
    ap.add_argument("--vocab", type=int, default=None,
                    help="model vocabulary (default: the toy tokenizer's 710; 50257 = GPT-2's, whose logits dominate)")
    ap.add_argument("--memory-child", choices=["mmalign", "trl"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    settings = {"both": [False, True], "off": [False], "on": [True]}[args.gc]
    if args.memory_child:
        return memory_child(args.memory_child, args.layers, args.width, args.heads, args.batch, args.steps,
                            settings[0], args.vocab)
    import tempfile

    import trl

    from mmalign.models.lm import load_tokenizer
    from mmalign.utils import print_table

    tok = load_tokenizer(None)
    rows = [json.loads(x) for x in open(DATA)][: max(512, args.batch * (args.steps + 2))]
    base = make_model(tok, args.layers, args.width, args.heads, args.vocab)
    res = {}
    for gc in settings:
        with tempfile.TemporaryDirectory() as tmp:
            loops = time_loops(base, tok, rows, args.batch, args.steps, tmp, gc)
        res["on" if gc else "off"] = {"loop": loops, "core": time_core(base, tok, rows, args.batch, gc),
                                      "peak_mb": measure_memory(args, gc)}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    n = sum(p.numel() for p in base.parameters())
    print(f"\nText DPO, GPT-2 {args.layers}x{args.width} ({n / 1e6:.1f}M params), batch {args.batch} pairs, "
          f"TRL {trl.__version__}, {device}; same gradient-checkpointing setting for both trainers per row "
          "(TRL's DPOConfig default: on; mmalign's: off)")
    mem_kind = "CUDA max allocated" if torch.cuda.is_available() else "RSS growth during train()"
    table, out = [], {"device": device, "params": n, "batch": args.batch, "steps": args.steps, "trl": trl.__version__}
    for k, r in res.items():
        lo, co, me = r["loop"], r["core"], r["peak_mb"]
        out[f"gc_{k}"] = r
        out[f"speed_ratio_vs_trl_gc_{k}"] = round(lo["trl"] / lo["mmalign"], 3)
        out[f"memory_ratio_vs_trl_gc_{k}"] = round(me["mmalign"] / me["trl"], 3) if me["trl"] > 0 else float("nan")
        table.append([f"checkpointing {k}", f"{lo['mmalign']:.4f}", f"{lo['trl']:.4f}",
                      f"{lo['trl'] / lo['mmalign']:.2f}x", f"{co['trl'] / co['mmalign']:.2f}x",
                      f"{me['mmalign']:.0f}", f"{me['trl']:.0f}", f"{out[f'memory_ratio_vs_trl_gc_{k}']:.2f}x"])
    print_table(["setting", "mmalign s/step", "TRL s/step", "speed (TRL / mmalign)", "core fwd+bwd speed",
                 f"mmalign MB ({mem_kind})", "TRL MB", "memory (mmalign / TRL)"], table)
    print("JSON " + json.dumps(out))


if __name__ == "__main__":
    main()
