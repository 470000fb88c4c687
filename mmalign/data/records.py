"""Reading tabular records from JSONL/JSON/parquet files, ``save_to_disk`` folders or the hub.

Everything comes back as a ``datasets.Dataset`` so recipes index rows uniformly. Errors name the
file and line (JSONL) or the missing column and what the data has.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from mmalign.paths import resolve


class DataError(ValueError):
    """Bad input data; the message names the source, row and field."""


def table_root(source: str | None) -> Path | None:
    """The folder that paths inside a table are relative to: a file's folder, a directory itself; ``None`` for
    a hub dataset (no folder of its own)."""
    if source is None:
        return None
    p = Path(resolve(source))
    return p.parent if p.is_file() else p if p.is_dir() else None


def load_table(source: str, split: str = "train"):
    """``source``: a .jsonl/.json/.parquet file, a directory of parquet files, a
    ``Dataset.save_to_disk`` directory (a DatasetDict picks ``split``), or a hub dataset name."""
    import datasets

    src = resolve(source)
    p = Path(src)
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return datasets.Dataset.from_list(_read_json(p))
        if suffix == ".parquet":
            return _parquet(str(p), p)
        raise DataError(f"{p}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            ds = datasets.load_from_disk(str(p))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"{p}: no split {split!r}; it has {list(ds)}")
                ds = ds[split]
            return ds
        files = sorted(p.rglob("*.parquet"))
        if files:
            return _parquet([str(f) for f in files], p)
        files = sorted(p.glob("*.jsonl"))
        if files:
            rows = [r for f in files for r in _read_json(f)]
            return datasets.Dataset.from_list(rows)
        raise DataError(f"{p}: directory holds no parquet/jsonl files and is not a saved dataset")
    try:
        return datasets.load_dataset(source, split=split)
    except Exception as e:  # offline, or no such dataset
        raise DataError(f"cannot load {source!r}: not a local file/directory, and the hub load failed ({e})") from e


def _parquet(files, where: Path):
    """``Dataset.from_parquet`` with its failures (a truncated or corrupt file, not parquet) as one DataError."""
    import datasets

    try:
        import pyarrow.parquet as pq

        if sum(pq.read_metadata(f).num_rows for f in ([files] if isinstance(files, str) else files)) == 0:
            raise DataError(f"{where}: no rows")
        ds = datasets.Dataset.from_parquet(files)
    except DataError:
        raise
    except Exception as e:  # pyarrow.ArrowInvalid, datasets' DatasetGenerationError, OSError...
        cause = e.__cause__ or e
        raise DataError(f"{where}: cannot read parquet ({type(cause).__name__}: {str(cause).splitlines()[0][:200]})") \
            from e
    if len(ds) == 0:
        raise DataError(f"{where}: no rows")
    return ds


def _read_json(path: Path) -> list[dict]:
    if path.suffix == ".json":
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: invalid JSON ({e})") from e
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records")
        return data
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON line ({e.msg})") from e
    if not rows:
        raise DataError(f"{path}: no records")
    return rows


def require_columns(ds, needed: list[str], source: str, why: str):
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing} needed for {why}; "
                        f"the data has {ds.column_names} (rename with data.columns)")


def rename_columns(ds, mapping: dict[str, str], source: str):
    for src, dst in mapping.items():
        if src not in ds.column_names:
            raise DataError(f"{source}: data.columns renames {src!r}, which is not a column ({ds.column_names})")
        if dst in ds.column_names:
            ds = ds.remove_columns(dst)
        ds = ds.rename_column(src, dst)
    return ds


# ------------------------------------------------------------------ writing tables


def write_rows(out: str, rows: list[dict]):
    """One dict per row to ``.jsonl`` or ``.csv`` (header from the first row's keys)."""
    if not out.endswith((".jsonl", ".csv")):
        raise DataError(f"--out must end in .csv or .jsonl, got {out}")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if out.endswith(".jsonl"):
        with open(out, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")
    else:
        with open(out, "w", newline="") as fh:
            fields = list(dict.fromkeys(k for r in rows for k in r))  # every key, in order of first appearance
            w = csv.DictWriter(fh, fieldnames=fields, restval="")
            w.writeheader()
            w.writerows({k: csv_cell(v) for k, v in r.items()} for r in rows)


FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(v):
    """A text cell that a spreadsheet would run as a formula (starting with = + - @, tab or CR: a prompt like
    ``=HYPERLINK(...)``) gets a leading apostrophe, the OWASP CSV-injection rule; numbers are left as they are."""
    return "'" + v if isinstance(v, str) and v.startswith(FORMULA_START) else v
