"""Reward-augmented relabelling (Zhang et al. 2024, "Reward-Augmented Data Enhances Direct Preference Alignment
of LLMs", arXiv 2410.08067, Sec. 3): every judged pair (x, y_w, y_l, r_w, r_l) becomes two goal-conditioned
pairs,

    (x | goal r_w,  y_w > y_l)        and        (x | goal r_l,  y_l > y_w)

so the policy learns what each quality level looks like instead of only "chosen beats rejected"; plain DPO
then trains on the result. At inference, condition on the highest goal.

As the authors' script does, pairs whose judge scores contradict their label (r_w < r_l) are dropped and ties
are kept. The goal enters through ``template`` (the authors use a system message; a plain-text recipe has no
system turn, so the default puts the goal on a line before the prompt).
"""
from __future__ import annotations

import math

from .records import DataError

DEFAULT_TEMPLATE = "[goal score: {score:g}]\n{prompt}"


def reward_augment(rows: list[dict], chosen_score: str = "score_chosen", rejected_score: str = "score_rejected",
                   template: str = DEFAULT_TEMPLATE, source: str = "data") -> tuple[list[dict], dict]:
    """``rows``: dicts with prompt, chosen, rejected and the two judge-score columns. Returns the relabelled
    rows (prompt, chosen, rejected, goal) and a report (pairs in, contradicting pairs dropped, ties kept,
    rows out)."""
    if not rows:
        raise DataError(f"{source}: no pairs to relabel")
    need = ["prompt", "chosen", "rejected", chosen_score, rejected_score]
    missing = [c for c in need if c not in rows[0]]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing} for reward-augmented relabelling; the data has "
                        f"{sorted(rows[0])} (name the score columns with --chosen-score/--rejected-score)")
    try:
        template.format(prompt="", score=0.0)
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(f"--template {template!r} must use only {{prompt}} and {{score}} ({e})") from e
    out, dropped, ties = [], 0, 0
    for i, r in enumerate(rows):
        try:
            sw, sl = float(r[chosen_score]), float(r[rejected_score])
        except (TypeError, ValueError) as e:
            raise DataError(f"{source}: row {i}: judge scores must be numbers, got {r[chosen_score]!r}, "
                            f"{r[rejected_score]!r}") from e
        if not (math.isfinite(sw) and math.isfinite(sl)):
            raise DataError(f"{source}: row {i}: judge scores must be finite, got {sw}, {sl}")
        if sw < sl:  # the fine-grained scores disagree with the label
            dropped += 1
            continue
        ties += sw == sl
        p, yw, yl = r["prompt"], r["chosen"], r["rejected"]
        out.append({"prompt": template.format(prompt=p, score=sw), "chosen": yw, "rejected": yl, "goal": sw})
        out.append({"prompt": template.format(prompt=p, score=sl), "chosen": yl, "rejected": yw, "goal": sl})
    return out, {"pairs": len(rows), "dropped_contradicting": dropped, "ties_kept": ties, "rows_out": len(out)}
