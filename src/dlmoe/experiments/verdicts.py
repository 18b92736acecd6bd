"""A verdict per paper claim, computed from paired seed differences — never written by a person.

A claim predicts the sign of a paired difference (e.g. "TC's final loss − EC's > 0"). With the
95 % Student-t interval of the mean difference over seeds:

  reproduced     the interval lies on the predicted side of 0
  contradicted   the interval lies on the other side
  inconclusive   the interval contains 0 (or fewer than 2 seeds)

For an inconclusive claim, `seeds_needed` is the smallest number of seeds whose interval would
exclude 0 if the mean and spread stayed as measured: the n with t(0.975, n−1)·sd/√n < |mean|.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from dlmoe.experiments.common import seed_stats, t95

REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced", "contradicted", "inconclusive"
MAX_SEEDS = 10_000  # beyond this the measured effect is indistinguishable from 0: reported as None


@dataclass(frozen=True)
class Verdict:
    claim: str  # the paper's claim, in words
    measure: str  # what the paired difference is, with the predicted sign
    mean: float
    ci95: float | None
    seeds: int
    verdict: str
    seeds_needed: int | None  # for an inconclusive claim; None: the effect is too small to resolve
    unit: str = "seeds"  # what one paired difference is (seeds, prompts, held-out batches, ...)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """The report's line: claim, verdict, the interval, and what would resolve it."""
        interval = f"{self.mean:+.3g}" + ("" if self.ci95 is None else f" ± {self.ci95:.2g}")
        count = f"{self.seeds} {self.unit}"
        text = f"**{self.verdict}** — {self.claim}: {self.measure} = {interval} (95 % t-interval, {count})"
        if self.verdict == INCONCLUSIVE:
            if self.seeds_needed is not None:
                text += f"; ≈ {self.seeds_needed} {self.unit} would resolve the effect as measured"
            else:
                text += f"; the measured effect is too small to resolve with any practical number of {self.unit}"
        return text


def seeds_needed(mean: float, std: float | None) -> int | None:
    """The smallest n ≥ 2 with t(0.975, n−1)·std/√n < |mean|; None when no n ≤ MAX_SEEDS does."""
    if std is None or mean == 0 or not math.isfinite(mean):
        return None
    if std == 0:
        return 2
    n = 2
    while n <= MAX_SEEDS:
        if t95(n - 1) * std / math.sqrt(n) < abs(mean):
            return n
        n = n + 1 if n < 64 else int(n * 1.1)
    return None


def verdict(
    claim: str, measure: str, differences: Sequence[float], *, predicted_sign: int = 1, unit: str = "seeds"
) -> Verdict:
    """The verdict on `claim` from paired `differences` (one per `unit`, e.g. per seed); `predicted_sign` ±1."""
    if predicted_sign not in (1, -1):
        raise ValueError(f"predicted_sign must be +1 or -1, got {predicted_sign!r}")
    values = [float(v) for v in differences if v is not None and math.isfinite(float(v))]
    if not values:
        raise ValueError(f"no finite paired difference for the claim {claim!r}")
    stats = seed_stats(values)
    mean, ci = stats["mean"], stats["ci95"]
    if ci is None:
        outcome = INCONCLUSIVE
    elif mean - ci > 0:
        outcome = REPRODUCED if predicted_sign > 0 else CONTRADICTED
    elif mean + ci < 0:
        outcome = REPRODUCED if predicted_sign < 0 else CONTRADICTED
    else:
        outcome = INCONCLUSIVE
    needed = seeds_needed(mean, stats["std"]) if outcome == INCONCLUSIVE else None
    return Verdict(claim, measure, mean, ci, len(values), outcome, needed, unit)
