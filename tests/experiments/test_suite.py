"""The results suite: what `make results` runs, and its plan printed before it starts."""

from pathlib import Path

import pytest

from dlmoe.experiments import EXPERIMENTS
from dlmoe.experiments.suite import SUITE, PlannedExperiment, plan, plan_lines, suite_args


def test_every_suite_entry_is_an_experiment_with_a_plan():
    assert {name for name, _ in SUITE} <= set(EXPERIMENTS)
    for name, args in suite_args(Path("out"), "docs/results.md", 1):
        planned = plan(name, args, step_s=0.1)
        assert planned.total_steps > 0 and planned.minutes == pytest.approx(
            planned.total_steps * 0.1 * (1 + planned.overhead) / 60
        )
        assert args.out == Path("out") / name and args.overwrite and args.results_doc == "docs/results.md"


def test_headline_comparisons_get_five_seeds_and_the_plan_counts_them():
    entries = dict(suite_args(Path("out"), None, 1, only=["ec-vs-tc", "retrofit"]))
    assert entries["ec-vs-tc"].seeds == 5 and entries["retrofit"].seeds == 5
    steps = plan("ec-vs-tc", entries["ec-vs-tc"], None).steps
    # 4 variants × 5 seeds, less the 2 seed-0 runs that are the chosen tuning runs; 3 + 2 tuning runs
    assert steps["variants"] == (4 * 5 - 2) * 1200 and steps["tuning"] == 5 * 1200


def test_unknown_suite_entry_refused():
    with pytest.raises(ValueError, match="unknown suite experiments \\['nope'\\]"):
        suite_args(Path("out"), None, 1, only=["nope"])


def test_plan_lines_total():
    plans = [PlannedExperiment("a", {"x": 100}, 0.0, 10.0), PlannedExperiment("b", {"y": 50, "z": 50}, 0.5, 5.0)]
    lines = plan_lines(plans, 0.2, 1)
    assert lines[0].startswith("calibration: 0.200 s per step") and "≈ 15 min (0.2 h)" in lines[-1]
    assert "200 steps" in lines[-1] and "y 50, z 50" in lines[2]
    assert plan_lines(plans, None, 1)[-1].rstrip().endswith("200 steps")
