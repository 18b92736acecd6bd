"""The results suite: every experiment behind docs/results.md, with the options it is run with, and
what it will cost on this machine before it starts (`dlmoe results --plan`, `make results`).

Each experiment module exposes `planned_steps(args) -> {phase: optimizer steps}` (every training
run it will make, base models and tuning included). The estimate multiplies the total by the
seconds per step this machine measures on the laptop preset right now (a short calibration run),
so it follows the machine's class and load; experiments that also sample or evaluate much more
than they train say so through a per-experiment `OVERHEAD` factor.
"""

from __future__ import annotations

import dataclasses
import importlib
import statistics
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlmoe.experiments import EXPERIMENTS, ExperimentArgs
from dlmoe.experiments.common import SCALES, scale_overrides
from dlmoe.experiments.jobs import TrainJob, run_jobs

# what `make results` runs: (experiment, options); the headline comparisons get 5 paired seeds
SUITE: tuple[tuple[str, dict[str, Any]], ...] = (
    ("ec-vs-tc", {"seeds": 5}),
    ("capacity-schedules", {"seeds": 5}),
    ("retrofit", {"seeds": 5}),
    ("learning-efficiency", {"seeds": 5}),
    ("block-routing", {}),
    ("capacity-policy", {"seeds": 1}),
)
CALIBRATION_STEPS = 30  # steps of the laptop preset timed (the first 5, warming up, are dropped)
DEFAULT_OVERHEAD = 0.15  # validation every eval_every steps and the controls, as a fraction of training time


@dataclass(frozen=True)
class PlannedExperiment:
    name: str
    steps: dict[str, int]  # phase → optimizer steps
    overhead: float  # evaluation / sampling time as a multiple of the training time
    minutes: float | None  # expected wall time (None without a calibration)

    @property
    def total_steps(self) -> int:
        return sum(self.steps.values())


def suite_args(
    out_root: Path, results_doc: str | None, jobs: int, only: Sequence[str] = ()
) -> list[tuple[str, ExperimentArgs]]:
    """(name, ExperimentArgs) of every suite entry (or those named in `only`), each writing to out_root/NAME."""
    unknown = sorted(set(only) - {name for name, _ in SUITE})
    if unknown:
        raise ValueError(f"unknown suite experiments {unknown}; the suite runs {[name for name, _ in SUITE]}")
    return [
        (name, ExperimentArgs(out=out_root / name, overwrite=True, results_doc=results_doc, jobs=jobs, **options))
        for name, options in SUITE
        if not only or name in only
    ]


def seconds_per_step(jobs: int = 1, corpus: str = "shakespeare") -> float:
    """Effective seconds per optimizer step of the laptop preset's EC model on this machine now, with
    `jobs` runs at once (their median step time / jobs): measured, so it follows the machine's class,
    its load and how well it runs concurrent jobs."""
    scale = dataclasses.replace(SCALES["laptop"], steps=CALIBRATION_STEPS, eval_every=CALIBRATION_STEPS)
    ec = {"model.moe.router.kind": "expert_choice", "train.eval_batches": 1}
    with tempfile.TemporaryDirectory(prefix="dlmoe-calibrate-") as tmp:
        out = Path(tmp)
        base = scale_overrides(scale, out / "runs", corpus, out / ".cache", scaling_factor=False)
        first, *timed = run_jobs(out, base, [TrainJob("c", i, ec) for i in range(1 + (jobs > 1) * jobs)],
                                 workers=jobs, control=False)  # fmt: skip
    runs = [r.run for r in (timed or [first])]
    return statistics.median(row["step_s"] for run in runs for row in run.rows[5:]) / len(runs)


def plan(name: str, args: ExperimentArgs, step_s: float | None) -> PlannedExperiment:
    """The training steps `name` will run with `args`, and the minutes they take at `step_s`."""
    module = importlib.import_module(EXPERIMENTS[name])
    steps = module.planned_steps(args)
    overhead = getattr(module, "OVERHEAD", DEFAULT_OVERHEAD)
    minutes = None if step_s is None else sum(steps.values()) * step_s * (1 + overhead) / 60
    return PlannedExperiment(name, steps, overhead, minutes)


def plan_lines(plans: Sequence[PlannedExperiment], step_s: float | None, jobs: int) -> list[str]:
    """The table `dlmoe results` prints before it starts."""
    head = (
        "calibration: not measured"
        if step_s is None
        else f"calibration: {step_s:.3f} s per step (laptop EC, {jobs} run(s) at once, measured now)"
    )
    lines = [head]
    for p in plans:
        phases = ", ".join(f"{k} {v}" for k, v in p.steps.items())
        when = "" if p.minutes is None else f" ≈ {p.minutes:.0f} min"
        lines.append(f"  {p.name:<20} {p.total_steps:>7} steps{when}  ({phases}; +{p.overhead:.0%} eval/sampling)")
    total = None if step_s is None else sum(p.minutes or 0.0 for p in plans)
    when = "" if total is None else f" ≈ {total:.0f} min ({total / 60:.1f} h)"
    lines.append(f"  {'total':<20} {sum(p.total_steps for p in plans):>7} steps{when}")
    return lines
