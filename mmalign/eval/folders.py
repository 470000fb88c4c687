"""Folders of sampled images (``mmalign sample`` writes them, with a ``metadata.jsonl``) paired by (prompt, seed)
across models, scored with every reward and reported (``mmalign eval --folder``)."""
from __future__ import annotations

from pathlib import Path

from mmalign.data.records import DataError, write_rows

from .report import write_gallery
from .stats import diversity_rows, fidelity_rows, summarize_scores

def align_folders(folders: dict[str, str | Path]) -> tuple[list[tuple[str, int]], dict[str, dict]]:
    """Items (prompt, seed) present in every folder, and per folder {(prompt, seed): metadata row}; folders
    that were not sampled on the same prompts and seeds are a clear error (nothing would be paired)."""
    from .sampling import read_metadata  # torch: loaded only when folders are compared

    by = {}
    for name, d in folders.items():
        rows = read_metadata(d)
        by[name] = {(r["prompt"], int(r["seed"])): r for r in rows}
    names = list(by)
    keys = set(by[names[0]])
    for n in names[1:]:
        if set(by[n]) != keys:
            only_a, only_b = sorted(keys - set(by[n]))[:3], sorted(set(by[n]) - keys)[:3]
            raise DataError(f"folders {names[0]!r} and {n!r} were not sampled on the same (prompt, seed) items: "
                            f"{len(keys - set(by[n]))} only in {names[0]} (e.g. {only_a}), "
                            f"{len(set(by[n]) - keys)} only in {n} (e.g. {only_b}); sample both with the same "
                            "--prompts and --seeds")
    order = sorted(keys, key=lambda k: (by[names[0]][k].get("prompt_index", 0), k[0], k[1]))
    return order, by


def _open(folder, name: str):
    from mmalign.data.images import open_image  # PIL: loaded only when folders are scored

    try:
        return open_image(name, root=Path(folder), where=f"{folder}/metadata.jsonl")
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{Path(folder) / name}: unreadable image ({type(e).__name__}: {e})") from e


SET_ROWS = ("diversity", "diversity_dino")
"""rewards that are a per-prompt measure: ``evaluate_folders`` reports them once, as its per-prompt diversity rows
(one value per prompt, averaged over its images), not also as a per-image reward row of the same name"""


def dino_measure(models: dict | None, device, tiny: bool):
    """The semantic per-prompt diversity (``dino_diversity``) on the DINO reward's backbone."""
    from mmalign.rewards import load_reward  # reward models (torch): loaded only when a DINO row is asked for
    from mmalign.rewards.signals import dino_diversity  # with it: signals imports torch

    return dino_diversity(load_reward("dino", model=(models or {}).get("dino"), device=device, tiny=tiny).backbone)


def evaluate_folders(folders: dict[str, str | Path], rewards: list[str], out: str | Path, base: str | None = None,
                     models: dict | None = None, extra: dict | None = None, tiny: bool = False, device=None,
                     batch_size: int = 16, seed: int = 0, gallery_items: int = 64,
                     reference_images: str | Path | None = None, inception_weights: str | None = None,
                     diversity: dict | None = None) -> dict:
    """Score every folder's images (paired by prompt and seed) with every reward, plus each model's per-prompt
    diversity (``diversity_rows``, one row per ``diversity`` measure, {name: measure or None for pixels}: flagged
    when it fell below the base's interval; ``diversity`` / ``diversity_dino`` among ``rewards`` are these rows,
    ``SET_ROWS``) and, given
    ``reference_images``, its FID / KID against them (``fidelity_rows``); write ``scores.csv`` (one row per item
    and model), ``summary.json`` / ``summary.csv`` and ``gallery.html`` under ``out``."""
    from mmalign.rewards.scoring import check_inputs, score_images  # reward models: loaded when scored

    diversity = dict(diversity or {"diversity": None})  # None: the pixel-space measure
    if "diversity_dino" in rewards and "diversity_dino" not in diversity:
        diversity["diversity_dino"] = dino_measure(models, device, tiny)
    rewards = [r for r in rewards if r not in SET_ROWS]
    out = Path(out)
    names = list(folders)
    base = base or names[0]
    keys, by = align_folders(folders)
    images = {n: [_open(folders[n], by[n][k]["file_name"]) for k in keys] for n in names}
    prompts = [k[0] for k in keys]
    check_inputs(rewards, [Path(by[base][k]["file_name"]) for k in keys], prompts, None)
    scores = {n: score_images(rewards, images[n], prompts, None, models, extra, tiny, device, batch_size)
              for n in names}
    rows = summarize_scores(scores, base=base, seed=seed)
    for name, measure in diversity.items():
        rows += diversity_rows(images, keys, base, seed, measure, name)
    if reference_images is not None:
        rows += fidelity_rows(folders, reference_images, inception_weights, device)
    write_rows(str(out / "scores.csv"), [{"model": n, "prompt": k[0], "seed": k[1], "file": by[n][k]["file_name"],
                                          **{r: scores[n][r][i] for r in rewards}}
                                         for n in names for i, k in enumerate(keys)])
    write_rows(str(out / "summary.csv"), rows)
    import json

    (out / "summary.json").write_text(json.dumps({"base": base, "models": names, "rewards": rewards,
                                                  "items": len(keys), "rows": rows}, indent=1))
    step = max(1, len(keys) // gallery_items)
    items = [{"prompt": k[0], "seed": k[1], "images": {n: images[n][i] for n in names},
              "scores": {n: {r: scores[n][r][i] for r in rewards} for n in names}}
             for i, k in list(enumerate(keys))[::step]]
    others = [n for n in names if n != base]
    write_gallery(out / "gallery.html", items, names, rows, title=f"mmalign eval: {', '.join(others)} vs {base}",
                  total=len(keys))
    return {"rows": rows, "scores": scores, "keys": keys, "base": base}
