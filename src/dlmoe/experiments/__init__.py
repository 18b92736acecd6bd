"""Research workflows: each claim of the EC-DLM and dMoE papers as one command (`dlmoe experiment NAME`).

Every experiment module exposes `run(args: ExperimentArgs) -> dict` (the results it also wrote).
Modules are imported on demand, so `dlmoe --help` stays fast.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlmoe.experiments.common import SCALES, Scale

EXPERIMENTS: dict[str, str] = {
    "ec-vs-tc": "dlmoe.experiments.ec_vs_tc",
    "capacity-schedules": "dlmoe.experiments.capacity_schedules",
    "learning-efficiency": "dlmoe.experiments.learning_efficiency",
    "block-routing": "dlmoe.experiments.block_routing",
    "retrofit": "dlmoe.experiments.retrofit",
    "capacity-policy": "dlmoe.experiments.capacity_policy",
}


@dataclass(frozen=True)
class ExperimentArgs:
    """Options shared by every experiment (CLI flags of `dlmoe experiment` / `dlmoe retrofit`)."""

    out: Path
    scale_name: str = "laptop"
    corpus: str = "shakespeare"
    seeds: int = 2
    steps: int | None = None  # overrides the scale's training steps
    overwrite: bool = False
    results_doc: str | None = None
    allow_unmatched: bool = False
    base_run: str | None = None  # a finished run to start from, where the experiment needs one
    mcq: tuple[str, ...] = ()  # multiple-choice jsonl files for quality (block-routing)
    extra: dict[str, Any] = field(default_factory=dict)  # experiment-specific options
    # EC-DLM's scripts all pass --enable-scaling-factor with shared experts; False = the ablation
    scaling_factor: bool = True
    jobs: int = 1  # training runs at once (dlmoe.experiments.jobs); wall-clock figures then share the cores

    def report_name(self, name: str) -> str:
        """The experiment's name in reports (docs/results.md sections): the ablation gets its own."""
        return name if self.scaling_factor else f"{name}-no-scaling-factor"

    @property
    def scale(self) -> Scale:
        return SCALES[self.scale_name]


def experiment_runner(name: str) -> Callable[[ExperimentArgs], dict]:
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; available: {sorted(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name]).run


__all__ = ["EXPERIMENTS", "SCALES", "ExperimentArgs", "Scale", "experiment_runner"]
