"""Training runs at once (`--jobs`) computes exactly what one after another computes."""

import os

import pytest

from dlmoe.experiments.common import scale_overrides
from dlmoe.experiments.jobs import TrainJob, check_jobs, run_jobs, threads_per_job

from .conftest import TINY

EC = {"model.moe.router.kind": "expert_choice"}
TC = {"model.moe.router.kind": "token_choice"}


def _train(tmp_path, corpus, workers: int):
    out = tmp_path / f"workers{workers}"
    base = scale_overrides(TINY, out / "runs", str(corpus), tmp_path / ".cache", scaling_factor=False)
    jobs = [TrainJob("ec", 0, EC), TrainJob("tc", 0, TC), TrainJob("ec", 1, EC)]
    return run_jobs(out, base, jobs, workers=workers)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores")
def test_parallel_runs_equal_sequential_runs(tmp_path, corpus):
    one, two = _train(tmp_path, corpus, 1), _train(tmp_path, corpus, 2)
    assert [(r.run.name, r.run.seed) for r in two] == [("ec", 0), ("tc", 0), ("ec", 1)]  # the order given
    for a, b in zip(one, two, strict=True):
        assert [row["loss"] for row in a.run.rows] == [row["loss"] for row in b.run.rows]
        assert a.run.final_val_loss == b.run.final_val_loss and a.run.val_bins == b.run.val_bins
        assert a.control == b.control and a.control["seed"] == a.run.seed
    tokenizers = {(r.run.run_dir / "tokenizer" / "tokenizer.json").read_bytes() for r in two}
    assert len(tokenizers) == 1  # one shared tokenizer, trained by the first run alone


@pytest.mark.parametrize("jobs", [0, -1, True, 1.5, "2", 10**6])
def test_bad_jobs_refused(jobs):
    with pytest.raises(ValueError, match="jobs must be an int from 1"):
        check_jobs(jobs)


def test_threads_split_the_cores():
    cores = os.cpu_count() or 1
    assert threads_per_job(1) == cores and threads_per_job(cores) == 1 and threads_per_job(10**6) == 1
