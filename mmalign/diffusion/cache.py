"""Disk cache of VAE latents and text embeddings for preference pairs (safetensors shards).

``build_cache`` encodes every pair once -- both images, unflipped and (optionally) flipped: the VAE
posterior mean and (for ``data.vae_latents=sample``) its std, and the caption(s) -- into
``shard-00000.safetensors``, ``shard-00001...``; every file (shards, ``meta.json``, ``empty.safetensors``,
``report.json``) is written to a temp file and renamed, so an interrupted build (a kill, a full disk) resumes
at the first missing shard, and a cache whose metadata cannot be read is rebuilt, with a message. Rows whose
images cannot be read are marked and listed in ``report.json``; ``CachedPairs`` skips them.

Where: ``cache_path(cfg, split)`` = ``<data.cache_dir>/<split>-<key>``, the key a hash of everything the cached
values depend on (``cache_key``: the model, its VAE / text encoders / tokenizers and their files, the encoder
dtype, the data source and its files, the preprocessing settings), so another model, VAE, crop or caption
source never reads this cache; a sweep over beta, lr or the loss shares it. Values are stored in ``dtype`` (the recipe passes
the training dtype: fp32 without mixed precision -- never silently fp16, which moves a per-pair loss by
up to ~0.03 at beta 5000). Latents are cached unpacked for every family (Flux packs them at step time).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from mmalign.config import keyed_fields, to_dict
from mmalign.paths import WEIGHT_SUFFIXES, fingerprint, resolve

from .data import ImagePairBatch, PairLatents, PairText, PreferencePairs
from .fill import CacheFill, required_keys
from .options import PairDrawOptions

Tensor = torch.Tensor


def _shard(path: Path, k: int) -> Path:
    return path / f"shard-{k:05d}.safetensors"


def cache_meta(pairs: PreferencePairs, flips: bool = True, text: bool = True, dtype: torch.dtype = torch.float32,
               std: bool = False, shard_size: int = 256) -> dict:
    """What a cache of ``pairs`` built with these settings records in its ``meta.json``."""
    return {"rows": len(pairs), "shard_size": shard_size, "source": str(pairs.source),
            "resolution": pairs.resolution, "flips": flips, "text": text,
            "dtype": str(dtype).removeprefix("torch."), "std": std}


def cache_options(options: PairDrawOptions, dtype: torch.dtype) -> dict:
    """The ``build_cache`` options the pair draws ask for -- one place for the build and for ``caches_complete``,
    so a finished cache is always recognised as the one the run would build."""
    return {"flips": options.random_flip, "dtype": dtype, "std": options.vae_latents == "sample"}


# data settings that do not change what is cached (step-time draws, other splits, bookkeeping); every other
# field of the data section is part of the key (tests/test_nothing_lost.py checks every field is one or the other)
NOT_CACHED = {"caption_dropout", "noise_draws", "cache_build", "shared_noise", "cache_dir", "allow_outside_root", "eval",
              "eval_split", "max_eval_examples", "train", "split", "max_examples", "cache_dtype"}
TEXT_SUFFIXES = (".json", ".txt", ".model")  # tokenizer files


def _source_fingerprint(source: str | None) -> dict:
    p = Path(resolve(source)) if source else None
    if p is None or not p.exists():
        return {"source": source}  # a hub dataset: its name
    tables = (".parquet", ".arrow", ".jsonl", ".json")
    return {"source": str(p.resolve()), "files": fingerprint(p, None if p.is_file() else tables)}


def _encoder_files(root: Path | None) -> dict:
    """Fingerprints of a pipeline folder's VAE, text encoders and tokenizers: what the cached inputs come from."""
    files = {}
    if root is not None and root.is_dir():
        for sub in sorted(x.name for x in root.iterdir() if x.is_dir()):
            if sub == "vae" or sub.startswith(("text_encoder", "tokenizer")):
                files[sub] = fingerprint(root / sub, WEIGHT_SUFFIXES + TEXT_SUFFIXES)
    return files


def cache_key(cfg, split: str, encoder_dtype: torch.dtype) -> dict:
    """Everything the cached latents and embeddings of ``split`` ("train" / "eval") depend on."""
    m, d = cfg.model, cfg.data
    root = Path(resolve(m.name_or_path)) if m.name_or_path else None
    files = _encoder_files(root)
    source, dsplit, limit = (d.train, d.split, d.max_examples) if split == "train" else \
        (d.eval, d.eval_split, d.max_eval_examples)
    data = {k: v for k, v in to_dict(d).items() if k not in NOT_CACHED}
    if d.center_crop:
        data.pop("seed", None)
    return {"model": {"kind": m.kind, "name_or_path": str(root.resolve()) if root and root.exists() else m.name_or_path,
                      "tiny": m.tiny, "vae": m.vae, "vae_files": fingerprint(m.vae, WEIGHT_SUFFIXES) if m.vae else None,
                      "files": files, "encoder_dtype": str(encoder_dtype)},
            "data": {**_source_fingerprint(source), "split": dsplit, "max_examples": limit, **data,
                     "dtype": str(cache_dtype(cfg)),
                     "crop_seed": None if d.center_crop else cfg.train.seed},
            "text_length": cfg.flow.max_sequence_length if m.kind in ("sd3", "flux") else None}


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cache_dtype(cfg) -> torch.dtype:
    """``data.cache_dtype``; auto = the training dtype (bf16 / fp16 under mixed precision, else fp32)."""
    if cfg.data.cache_dtype != "auto":
        return getattr(torch, cfg.data.cache_dtype)
    return HALF.get(cfg.train.mixed_precision, torch.float32)


def cache_path(cfg, split: str, encoder_dtype: torch.dtype) -> Path:
    """``<data.cache_dir>/<split>-<hash of cache_key>``."""
    key = json.dumps(cache_key(cfg, split, encoder_dtype), sort_keys=True, default=str)
    return Path(cfg.data.cache_dir) / f"{split}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def caches_complete(cfg, splits: dict, encoder_dtype: torch.dtype) -> bool:
    """True when ``data.cache_dir`` holds a finished cache for every split (``{name: pairs or None}``) as the
    diffusion recipe builds it: a run on it never needs the VAE or the text encoders."""
    o = cache_options(cfg.data, cache_dtype(cfg))
    return bool(cfg.data.cache_dir) and all(
        cache_complete(cache_path(cfg, name, encoder_dtype), cache_meta(p, o["flips"], True, o["dtype"], o["std"]))
        for name, p in splits.items() if p is not None)


def write_atomic(path: Path, data: bytes | str):
    """Write ``path`` whole or not at all (temp file + rename): a full disk or a kill leaves the old file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def _read_meta(path: Path) -> dict | None:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def cache_complete(path: str | Path, meta: dict) -> bool:
    """True when ``path`` holds a finished cache with exactly ``meta``: every shard, the report and (text
    caches) the empty-prompt conditioning -- a training run on it needs neither the VAE nor the text encoders."""
    path = Path(path)
    old = _read_meta(path)
    if old is None:
        return False
    if {k: old.get(k) for k in meta} != meta or not (path / "report.json").exists():
        return False
    if meta["text"] and not (path / "empty.safetensors").exists():
        return False
    return all(_shard(path, k).exists() for k in range(math.ceil(meta["rows"] / meta["shard_size"])))


@torch.no_grad()
def build_cache(pairs: PreferencePairs, encode_pixels, path: str | Path, encode_text=None, flips: bool = True,
                shard_size: int = 256, batch_size: int = 16, progress: bool = True, dtype: torch.dtype = torch.float32,
                std: bool = False) -> dict:
    """``encode_pixels([B,2,3,H,W]) -> (mean, std)`` each ``[B,2,C,h,w]``; ``encode_text(list[str]) -> Cond``
    (embeds [B,T,D], pooled | None, txt_ids | None). ``std``: keep the posterior std too."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = cache_meta(pairs, flips, encode_text is not None, dtype, std, shard_size)
    meta_file = path / "meta.json"
    if meta_file.exists() or any(path.iterdir()):
        old = _read_meta(path)
        if old is None or {k: old.get(k) for k in meta} != meta:  # unreadable (a full disk, a kill) or other
            print(f"cache {path}: {'unreadable meta.json' if old is None else 'built with other settings'}; "
                  "rebuilding it", flush=True)
            for f in path.iterdir():
                if f.is_file():
                    f.unlink()
    write_atomic(meta_file, json.dumps(meta))
    n_shards = math.ceil(len(pairs) / shard_size)
    todo = [k for k in range(n_shards) if not _shard(path, k).exists()]
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo) * shard_size, desc=f"caching latents -> {path}", dynamic_ncols=True)
    corrupt = []
    for k in todo:
        rows = list(range(k * shard_size, min(len(pairs), (k + 1) * shard_size)))
        out: dict[str, list] = {}
        ok = torch.zeros(len(rows), dtype=torch.uint8)
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo: lo + batch_size]
            items = [pairs[i] for i in chunk]
            good = [j for j, it in enumerate(items) if it is not None]
            corrupt += [pairs.rows[chunk[j]] for j, it in enumerate(items) if it is None]
            if not good:
                continue
            for j in good:
                ok[lo + j] = 1
            enc = _encode_rows([items[j] for j in good], encode_pixels, encode_text, flips, std, pairs.dual)
            for key, v in enc.items():
                buf = out.setdefault(key, [None] * len(rows))
                for jj, j in enumerate(good):
                    buf[lo + j] = v[jj].cpu() if key in ("original_size", "crop_top_left") else v[jj].cpu().to(dtype)
            if bar is not None:
                bar.update(len(chunk))
        _write_shard(path, k, ok, out)
    if bar is not None:
        bar.close()
    if encode_text is not None and not (path / "empty.safetensors").exists():
        write_empty(path, encode_text, dtype)
    return _write_report(path, len(pairs), corrupt, n_shards)


def _write_shard(path: Path, k: int, ok: Tensor, out: dict[str, list]):
    """Shard ``k``: ``ok`` [rows] (0 = unreadable) and each key's per-row tensors (None -> zeros), atomically."""
    tensors = {"ok": ok}
    for key, buf in out.items():
        like = next(x for x in buf if x is not None)
        tensors[key] = torch.stack([x if x is not None else torch.zeros_like(like) for x in buf])
    tmp = path / f".shard-{k:05d}.tmp"
    save_file({key: v.contiguous() for key, v in tensors.items()}, str(tmp))
    os.replace(tmp, _shard(path, k))


def compact_fill(pairs: PreferencePairs, path: str | Path, flips: bool = True, dtype: torch.dtype = torch.float32,
                 std: bool = False, shard_size: int = 256) -> bool:
    """Turn a cache filled while training (``mmalign.diffusion.fill``) into the shard cache ``build_cache`` writes,
    when it holds every row (each key of ``required_keys``, or marked unreadable) and the empty prompt; the parts
    are removed after. False (and nothing written) while rows are missing."""
    path = Path(path)
    fill = CacheFill(path, dtype)
    have, need = fill.rows(), required_keys(flips, std, pairs.dual)
    if not (path / "empty.safetensors").exists() or any(
            "bad" not in have.get(i, ()) and not need <= have.get(i, set()) for i in range(len(pairs))):
        return False
    extra = sorted({k for keys in have.values() for k in keys if k.startswith("pooled_")})
    write_atomic(path / "meta.json", json.dumps(cache_meta(pairs, flips, True, dtype, std, shard_size)))
    n_shards = math.ceil(len(pairs) / shard_size)
    for k in range(n_shards):
        rows = range(k * shard_size, min(len(pairs), (k + 1) * shard_size))
        ok = torch.tensor([int("bad" not in have.get(i, ())) for i in rows], dtype=torch.uint8)
        out: dict[str, list] = {}
        for key in sorted(need - {"size"}) + extra:
            out[key] = [fill.get(i, key) if o else None for i, o in zip(rows, ok)]
        size = [fill.get(i, "size") if o else None for i, o in zip(rows, ok)]
        out["original_size"] = [None if z is None else z[:2] for z in size]
        out["crop_top_left"] = [None if z is None else z[2:] for z in size]
        _write_shard(path, k, ok, out if any(ok) else {})  # (a shard of unreadable rows holds only "ok")
    corrupt = [pairs.rows[i] for i in range(len(pairs)) if "bad" in have.get(i, ())]
    _write_report(path, len(pairs), corrupt, n_shards)
    for f in fill.dir.glob("*"):
        f.unlink()
    fill.dir.rmdir()
    return True


def _encode_rows(items: list[dict], encode_pixels, encode_text, flips: bool, std: bool, dual: bool) -> dict:
    """One batch of readable rows encoded: latents (posterior mean; its std with ``std``; both again for the
    mirrored images with ``flips``), SDXL size / crop conditioning, and the text embeddings of the caption (and of
    the rejected image's caption for dual-caption data)."""
    pix = torch.stack([it["pixels"] for it in items])
    mean, sd = encode_pixels(pix)
    enc = {"latents": mean,
           "original_size": torch.tensor([it["original_size"] for it in items], dtype=torch.float32),
           "crop_top_left": torch.tensor([it["crop_top_left"] for it in items], dtype=torch.float32)}
    if std:
        enc["latents_std"] = sd
    if flips:
        fm, fs = encode_pixels(pix.flip(-1))
        enc["latents_flip"] = fm
        if std:
            enc["latents_std_flip"] = fs
    if encode_text is not None:
        for side, key in (("w", "caption"), ("l", "caption_rejected")) if dual else (("w", "caption"),):
            c = encode_text([it[key] for it in items])
            enc[f"embeds_{side}"] = c.embeds
            if c.pooled is not None:
                enc[f"pooled_{side}"] = c.pooled
    return enc


def write_empty(path: Path, encode_text, dtype: torch.dtype):
    """The empty prompt's embeddings (caption dropout, classifier-free guidance), written atomically."""
    c = encode_text([""])
    empty = {"embeds": c.embeds[0], "pooled": None if c.pooled is None else c.pooled[0], "txt_ids": c.txt_ids}
    tmp = path / ".empty.safetensors.tmp"
    save_file({k: v.cpu().to(dtype).contiguous() for k, v in empty.items() if v is not None}, str(tmp))
    os.replace(tmp, path / "empty.safetensors")


def _write_report(path: Path, rows: int, corrupt: list, n_shards: int) -> dict:
    """report.json: the rows whose images could not be read, over this and earlier (interrupted) builds."""
    report_file = path / "report.json"
    try:
        prev = json.loads(report_file.read_text())["corrupt_rows"] if report_file.exists() else []
    except (ValueError, KeyError):
        prev = []  # a half-written report of an older build: this build's rows are listed again
    report = {"rows": rows, "corrupt_rows": sorted(set(prev + corrupt)), "shards": n_shards}
    write_atomic(report_file, json.dumps(report))
    return report


class CachedPairs(torch.utils.data.Dataset):
    """Reads a built cache; captions and metadata come from the underlying ``PreferencePairs`` rows."""

    def __init__(self, path: str | Path, pairs: PreferencePairs):
        self.path, self.pairs = Path(path), pairs
        self.meta = json.loads((self.path / "meta.json").read_text())
        if self.meta["rows"] != len(pairs):
            raise ValueError(f"cache {path} has {self.meta['rows']} rows, the data has {len(pairs)}")
        self.shard_size = self.meta["shard_size"]
        self._open: dict[int, dict] = {}
        self.empty = self.read_empty(self.path)
        self.source, self.dual, self.resolution = pairs.source, pairs.dual, pairs.resolution

    @staticmethod
    def read_empty(path: Path) -> dict | None:
        """The empty prompt's cached conditioning (``empty.safetensors``), if written."""
        if not (Path(path) / "empty.safetensors").exists():
            return None
        with safe_open(str(Path(path) / "empty.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def __len__(self):
        return len(self.pairs)

    def describe(self) -> str:
        return self.pairs.describe() + f" [cached in {self.path}]"

    def _shard(self, k: int) -> dict:
        if k not in self._open:
            if len(self._open) > 4:
                self._open.pop(next(iter(self._open)))
            with safe_open(str(_shard(self.path, k)), "pt") as f:
                self._open[k] = {key: f.get_tensor(key) for key in f.keys()}
        return self._open[k]

    def __getitem__(self, i):
        i = int(i)
        k, j = divmod(i, self.shard_size)
        sh = self._shard(k)
        if not sh["ok"][j]:
            return None
        row = self.pairs.ds[self.pairs.rows[i]]
        swap = self.pairs.swap[i]
        out = {"index": i, "latents": sh["latents"][j],
               "latents_flip": sh["latents_flip"][j] if "latents_flip" in sh else sh["latents"][j]}
        if "latents_std" in sh:
            out["latents_std"] = sh["latents_std"][j]
            out["latents_std_flip"] = sh["latents_std_flip"][j] if "latents_std_flip" in sh else sh["latents_std"][j]
        for key in ("embeds_w", "embeds_l", "pooled_w", "pooled_l"):
            if key in sh:
                out[key] = sh[key][j]
        if self.dual:
            c0, c1 = row["caption_0"], row["caption_1"]
            out["caption"], out["caption_rejected"] = (c1, c0) if swap else (c0, c1)
        else:
            out["caption"] = row["caption"]
        out["original_size"], out["crop_top_left"] = sh["original_size"][j].tolist(), sh["crop_top_left"][j].tolist()
        out["label"] = self.pairs.labels[i]
        return out

    def collate(self, items: list) -> ImagePairBatch:
        good = [x for x in items if x is not None]
        b = ImagePairBatch(
            captions=[x["caption"] for x in good],
            index=torch.tensor([x["index"] for x in good], dtype=torch.long),
            original_size=torch.tensor([x["original_size"] for x in good], dtype=torch.float32).view(-1, 2),
            crop_top_left=torch.tensor([x["crop_top_left"] for x in good], dtype=torch.float32).view(-1, 2),
            captions_rejected=[x["caption_rejected"] for x in good] if self.dual else None,
            labels=torch.tensor([x["label"] for x in good], dtype=torch.float32) if self.pairs.soft else None,
            skipped=len(items) - len(good))
        if good:
            stack = lambda key: torch.stack([x[key] for x in good]) if key in good[0] else None  # noqa: E731
            b.latents = PairLatents(stack("latents"), stack("latents_flip"), stack("latents_std"),
                                    stack("latents_std_flip"))
            if "embeds_w" in good[0]:
                b.text = PairText(stack("embeds_w"), stack("embeds_l"), stack("pooled_w"), stack("pooled_l"))
        return b


# ------------------------------------------------------------------ precomputed reference tables

# settings that do not change the reference's scores (the trained adapters, the optimisation, bookkeeping)
def reference_table_path(cfg, split: str, draws: int) -> Path | None:
    """Where ``model.reference=precomputed`` keeps its table of reference scores for ``split``:
    ``<data.cache_dir>/reference/<split>-<key>.safetensors``, the key a hash of everything the scores depend
    on (model and its weight files, the data files and what encodes them, data and noise settings, seed,
    precision) and of nothing else -- so a sweep over beta, learning rate, loss or LoRA rank on the same data
    reuses one table, and a data file or VAE rewritten in place does not."""
    if not cfg.data.cache_dir:
        return None
    model = keyed_fields(cfg.model, "reference")  # less the fields declared not_in("reference") (LoRA, EMA, ...)
    weights, root = [], Path(resolve(cfg.model.name_or_path)) if cfg.model.name_or_path else None
    if root is not None:
        weights = [fingerprint(root / sub, WEIGHT_SUFFIXES) for sub in ("unet", "transformer")]
    data = keyed_fields(cfg.data, "reference")  # less how the cache fills (cache_build): not a score
    inputs = {"source": _source_fingerprint(cfg.data.train if split == "train" else cfg.data.eval),
              "encoders": _encoder_files(root),
              "vae": fingerprint(cfg.model.vae, WEIGHT_SUFFIXES) if cfg.model.vae else None}
    key = {"model": model, "weights": weights, "data": data, "inputs": inputs, "flow": to_dict(cfg.flow),
           "seed": cfg.train.seed, "precision": cfg.train.mixed_precision, "draws": draws, "split": split,
           "ppd": to_dict(cfg.ppd) if cfg.ppd is not None else None}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(cfg.data.cache_dir) / "reference" / f"{split}-{digest}.safetensors"


def load_or_compute_table(path: Path | None, compute, save: bool = True) -> torch.Tensor:
    """The table at ``path`` if an earlier run wrote it, else ``compute()`` (written atomically when ``save``)."""
    if path is not None and path.exists():
        return load_file(str(path))["mse"]
    table = compute()
    if path is not None and save:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"mse": table.contiguous()}, str(tmp))
        os.replace(tmp, path)
    return table


@torch.no_grad()
def precompute_table(data, inputs, ref_mse, split: str, draws: int, device, batch_size: int = 16) -> torch.Tensor:
    """``ref_mse(x0, noise, t, cond)`` for every (row, draw) of ``data``, with each pair's keyed draws
    (``inputs``: ``PairInputs``): ``[N, draws, 2]`` (winner, loser)."""
    table = torch.zeros(len(data), draws, 2)
    for k in range(draws):
        for lo in range(0, len(data), batch_size):
            batch = data.collate([data[i] for i in range(lo, min(len(data), lo + batch_size))])
            if len(batch) == 0:
                continue
            batch.to(device)
            gens = inputs.generators(batch, k, split)
            x0, noise, t, cond = inputs.build(batch, gens, split)
            w, l_ = ref_mse(x0, noise, t, cond).chunk(2)
            table[batch.index.cpu(), k] = torch.stack([w, l_], -1).cpu()
    return table


class ReferenceRecord:
    """The reference scores the steps computed, kept in ``data.cache_dir`` for the next run that draws the same
    noise: a pair's draws are keyed by (seed, step, row) (``PairInputs.generator``), so a later run of a sweep --
    another beta, learning rate, loss or LoRA rank on the same data and seed -- meets the same (step, row) draws
    and reads their scores instead of running the reference forward (one of the step's three denoiser passes).
    Eval draws do not depend on the step: every eval after the first reads them, within the run too.

    Files: ``<reference_table_path stem>-steps-<rank>.safetensors`` beside the precomputed tables, under the same
    key (everything the scores depend on, nothing else); one per process, all read at start. ``lookup`` answers
    only when every pair of the batch is known (else the batch is computed as usual and ``add``-ed), so a record
    from a run with another batch size is read where it covers a batch and never mixes into one."""

    def __init__(self, prefix: Path, rank: int = 0):
        self.path = prefix.with_name(f"{prefix.stem}-steps-{rank}.safetensors")
        # per step, chunks of (rows [n], scores [n, 2]): every process's, read at start, and this one's new ones --
        # a few tensors per step, not a Python object per pair (a long run records millions of pairs)
        self.by_step: dict[int, list[tuple[Tensor, Tensor]]] = {}
        self.own: list[tuple[Tensor, Tensor]] = []  # this process's file: (keys [n, 2], scores [n, 2]) chunks
        self.known = self.new = self.reads = 0  # pairs known; added since the last flush; batches answered
        for f in sorted(prefix.parent.glob(f"{prefix.stem}-steps-*.safetensors")):
            try:
                t = load_file(str(f))
                keys, mse = t["keys"], t["mse"]
            except Exception as e:  # a torn file from a killed run: recomputed, never trusted
                print(f"note: reference record {f} unreadable ({type(e).__name__}); its scores are recomputed")
                continue
            self._index(keys, mse)
            if f == self.path:
                self.own.append((keys, mse))

    def _index(self, keys: Tensor, mse: Tensor):
        order = keys[:, 0].argsort(stable=True)
        keys, mse = keys[order], mse[order]
        steps, counts = keys[:, 0].unique_consecutive(return_counts=True)
        for step, rows, scores in zip(steps.tolist(), keys[:, 1].split(counts.tolist()), mse.split(counts.tolist())):
            self.by_step.setdefault(step, []).append((rows, scores))
        self.known += len(keys)

    def lookup(self, step: int, rows: Tensor) -> Tensor | None:
        """``[2B]`` (winners' scores, then losers'), as the reference forward returns them, or None."""
        chunks = self.by_step.get(step)
        if not chunks or len(rows) == 0:
            return None
        have = torch.cat([c[0] for c in chunks])
        match = rows.cpu().long()[:, None] == have[None, :]
        if not bool(match.any(1).all()):
            return None
        wl = torch.cat([c[1] for c in chunks])[match.int().argmax(1)]
        self.reads += 1
        return torch.cat([wl[:, 0], wl[:, 1]])

    def add(self, step: int, rows: Tensor, ref: Tensor):
        w, l_ = ref.detach().float().cpu().chunk(2)
        rows = rows.cpu().long()
        keys, mse = torch.stack([torch.full_like(rows, step), rows], -1), torch.stack([w, l_], -1)
        self._index(keys, mse)
        self.own.append((keys, mse))
        self.new += len(rows)

    def flush(self):
        """Write this process's scores (atomically: a temp file, then rename), when any are new."""
        if not self.new:
            return
        self.own = [(torch.cat([k for k, _ in self.own]), torch.cat([m for _, m in self.own]))]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, save({"keys": self.own[0][0].contiguous(), "mse": self.own[0][1].contiguous()}))
        self.new = 0
