"""A guard against reward hacking: a held-out panel scored after every online round, next to the trained reward.

At every evaluation point (the base model, then the end of each round) the online source reports, for the
trained reward and each panel entry, a mean with its bootstrap interval (``evaluation.bootstrap_ci``). A
panel entry has **fallen** when its mean is below the lower end of the interval it had at its best point so
far. The guard counts the rounds in a row in which the trained reward rose over the previous point while
some panel entry had fallen; at ``patience`` such rounds it stops the run, and the run keeps the weights of
the **best point**: the highest trained reward among points where no panel entry had fallen.

Which entries count: panel rewards and ``diversity`` (higher is better). Saturation, brightness and latent
norm are reported and plotted but do not trigger the guard -- their healthy direction depends on the task
(a correct colour may be a more saturated one), so a move alone is not evidence of hacking.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Guard:
    patience: int = 2
    """stop after this many consecutive rounds of (trained reward up, a panel entry fallen); 0 = report only"""
    points: list[dict] = field(default_factory=list)
    streak: int = 0
    best_point: int | None = None
    stopped: bool = False

    def update(self, step: int, trained: tuple[float, float, float], panel: dict[str, tuple[float, float, float]]) -> dict:
        """Add an evaluation point (``(mean, lo, hi)`` for the trained reward and each guarded panel entry);
        returns the guard's state for the round log."""
        fallen = []
        for k, (m, _, _) in panel.items():
            best = max((p["panel"][k] for p in self.points if k in p["panel"]), key=lambda x: x[0], default=None)
            if best is not None and m < best[1]:
                fallen.append(k)
        rising = bool(self.points) and trained[0] > self.points[-1]["trained"][0]
        self.streak = self.streak + 1 if (rising and fallen) else 0
        self.points.append({"step": step, "trained": list(trained), "panel": {k: list(v) for k, v in panel.items()},
                            "fallen": fallen})
        clean = [i for i, p in enumerate(self.points) if not p["fallen"]]
        if clean:
            self.best_point = max(clean, key=lambda i: self.points[i]["trained"][0])
        if self.patience and self.streak >= self.patience:
            self.stopped = True
        return {"fallen": fallen, "streak": self.streak, "best_step": self.points[self.best_point]["step"]
                if self.best_point is not None else None, "stop": self.stopped}

    @property
    def best_is_latest(self) -> bool:
        return self.best_point == len(self.points) - 1

    def state_dict(self) -> dict:
        return {"points": self.points, "streak": self.streak, "best_point": self.best_point, "stopped": self.stopped}

    def load_state_dict(self, s: dict):
        self.points, self.streak, self.best_point, self.stopped = (s["points"], s["streak"], s["best_point"],
                                                                   s["stopped"])
