"""Training an experiment's variants, one after another or several at once (`--jobs N`).

A laptop experiment is dozens of small training runs (variants × seeds). Small models use two
threads poorly, so N processes with cores/N threads each finish the list sooner than one process
with every core. Nothing a run computes depends on what ran beside it (each run is seeded and
deterministic); only its wall-clock figures do, which is why the provenance records `jobs` and the
reports say so. The first run trains the experiment's tokenizer alone, so every run shares it.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlmoe.experiments.common import VariantRun, train_variant


@dataclass(frozen=True)
class TrainJob:
    """One training run of an experiment: variant `name` with `seed` and its config overrides."""

    name: str
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class JobResult:
    run: VariantRun
    control: dict[str, float] | None  # the routed-experts-off control, when asked for


def check_jobs(jobs: Any) -> int:
    """`jobs` as a validated int: 1 … the number of CPU cores."""
    cores = os.cpu_count() or 1
    if isinstance(jobs, bool) or not isinstance(jobs, int) or not 1 <= jobs <= cores:
        raise ValueError(f"jobs must be an int from 1 to the {cores} CPU cores of this machine, got {jobs!r}")
    return jobs


def threads_per_job(jobs: int) -> int:
    """Cores shared evenly between the concurrent runs (at least one thread each)."""
    return max(1, (os.cpu_count() or 1) // jobs)


def run_jobs(
    out: Path, base: dict[str, Any], jobs: Sequence[TrainJob], *, workers: int = 1, control: bool = True
) -> list[JobResult]:
    """Train every job (results in the order given). With `workers` > 1 they run in that many
    spawned processes; the first job runs alone so that it trains the shared tokenizer."""
    check_jobs(workers)
    jobs = list(jobs)
    if workers == 1 or len(jobs) < 2:
        return [_train(out, base, job, control) for job in jobs]
    results = [_train(out, base, jobs[0], control)]
    threads = threads_per_job(workers)
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_set_threads, initargs=(threads,)) as pool:
        futures = [pool.submit(_train, out, base | {"train.threads": threads}, job, control) for job in jobs[1:]]
        results += [future.result() for future in futures]
    return results


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _train(out: Path, base: dict[str, Any], job: TrainJob, control: bool) -> JobResult:
    from dlmoe.experiments.controls import routed_experts_control

    run = train_variant(out, job.name, job.seed, base, job.overrides)
    return JobResult(run, routed_experts_control(run.run_dir) | {"seed": job.seed} if control else None)
