"""`dlmoe experiment learning-efficiency`: output contract at a tiny scale, bin restriction, the same-bin
comparison and the verdicts on hand-made numbers, render-from-raw, CLI."""

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from dlmoe.cli import main
from dlmoe.diffusion.noise import add_mask_noise
from dlmoe.experiments import SCALES, ExperimentArgs, learning_efficiency
from dlmoe.experiments.learning_efficiency import (
    base_scale,
    ce_change,
    claim_verdicts,
    default_steps,
    efficiency,
    in_bin_efficiency,
    mask_ratio_bins,
    ratio,
    render,
    run,
    same_bin,
    summarize,
)
from dlmoe.experiments.raw_data import RESULTS, SERIES
from dlmoe.experiments.verdicts import CONTRADICTED, INCONCLUSIVE, REPRODUCED, Verdict, verdict
from tests.experiments.conftest import TINY

SCALE = dataclasses.replace(TINY, steps=2, eval_batches=1)
JOBS = min(2, os.cpu_count() or 1)
RESULT_KEYS = {"experiment", "settings", "probes", "per_bin", "ce_change", "same_bin", "summary", "controls"}
SUMMARY_KEYS = {
    "lowest_bin",
    "highest_bin",
    "headline",
    "verdicts",
    "ratio_lowest_to_highest",
    "low_mask_advantage",
    "equal_progress_ratio",
    "paper_claim",
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, dict, dict]:
    """Through the CLI: base trained inside --out, 2 bins (the CLI has no bin option) × 2 seeds × 1 step."""
    out = tmp_path_factory.mktemp("le") / "out"
    argv = ["experiment", "learning-efficiency", "--out", str(out), "--scale", "tiny", "--corpus", str(corpus)]
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setitem(SCALES, "tiny", SCALE)
        mp.setattr(learning_efficiency, "DEFAULT_BINS", 2)
        assert main([*argv, "--seeds", "2", "--steps", "1"]) == 0
    return out, json.loads((out / "results.json").read_text()), json.loads(printed.getvalue().splitlines()[-1])


def test_output_contract(finished: tuple[Path, dict, dict]) -> None:
    out, results, _ = finished
    assert json.loads((out / "experiment.json").read_text())["experiment"] == "learning-efficiency"
    assert set(results) == RESULT_KEYS and set(results["summary"]) == SUMMARY_KEYS
    s = results["settings"]
    assert s["base_trained_here"] and s["base_router"] == "expert_choice" and s["base_steps"] == SCALE.steps
    assert s["eval_rows"] == SCALE.eval_batches * SCALE.batch_size and 0 < len(s["val_bins_before"]) <= 10
    assert len(results["probes"]) == 4 and [b["bin"] for b in results["per_bin"]] == [[0.0, 0.5], [0.5, 1.0]]
    for b in results["per_bin"]:
        assert set(b) == {
            "bin",
            "masked_tokens_per_step",
            "delta_elbo",
            "delta_ce_in_bin",
            *learning_efficiency.VARIANTS,
        }
        assert set(b["per_masked_token"]) == {"mean", "std", "ci95", "n", "values"}
        assert b["per_masked_token"]["std"] is not None
    assert len(results["ce_change"]["delta_ce"]) == 2 and all(len(r) == 10 for r in results["ce_change"]["delta_ce"])
    same = results["same_bin"]
    assert len(same["per_masked_token"]) == 2 and len(same["lowest_vs_highest"]) == 10
    (control,) = results["controls"]["base"]  # the routed-experts-off control of the base
    assert control["routed_contribution"] == pytest.approx(control["val_elbo_routed_off"] - control["val_elbo"])
    assert [v["seeds"] for v in results["summary"]["verdicts"]] == [2, 2]
    for name in ("efficiency.png", "same_bin.png", "ce_change.png"):
        assert (out / name).stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert md.startswith("## learning-efficiency") and "![same_bin]" in md and "Routed-experts-off control" in md
    assert not list((out / "runs").glob("*/checkpoints")) and not list((out / "runs").glob("*/model"))


def test_probes_are_measured_against_one_start_and_count_masked_tokens(finished: tuple[Path, dict, dict]) -> None:
    _, results, _ = finished
    before = results["settings"]["elbo_before"]
    for p in results["probes"]:
        assert p["steps"] == 1 and p["tokens"] == SCALE.batch_size * SCALE.seq_len
        assert 0 < p["masked_tokens"] <= p["tokens"]
        assert p["delta_elbo"] == pytest.approx(before - p["elbo_after"])
        assert p["per_masked_token"] == pytest.approx(p["delta_elbo"] / p["masked_tokens"])
    for j, row in enumerate(results["same_bin"]["per_masked_token"]):  # the same-bin matrix from the probes
        probes = [p for p in results["probes"] if p["bin"] == results["per_bin"][j]["bin"]]
        for k, cell in enumerate(row):
            values = [p["delta_ce"][k] / p["masked_tokens"] if p["delta_ce"][k] is not None else None for p in probes]
            assert cell is None if None in values else cell["values"] == pytest.approx(values)


@pytest.mark.slow  # spawning the workers (torch imports) dominates at this size
@pytest.mark.skipif(JOBS < 2, reason="needs 2 CPU cores")
def test_probes_in_parallel_equal_probes_in_sequence(finished: tuple[Path, dict, dict], tmp_path: Path) -> None:
    """--jobs 2: the probes after the first run in spawned processes; from the same base, nothing changes."""
    out, results, _ = finished
    args = ExperimentArgs(
        out=tmp_path / "again", scale_name="tiny", corpus="unused: the base run holds its data", seeds=2, steps=1,
        base_run=str(out / "base"), extra={"num_bins": 2}, jobs=JOBS,
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SCALES, "tiny", SCALE)
        again = run(args)
    keys = ("bin", "seed", "elbo_after", "masked_tokens", "t_drawn", "delta_ce")
    assert [{k: p[k] for k in keys} for p in again["probes"]] == [{k: p[k] for k in keys} for p in results["probes"]]
    assert again["controls"] == results["controls"] and again["summary"]["verdicts"] == results["summary"]["verdicts"]


def test_fine_tuning_noise_stays_in_its_bin(finished: tuple[Path, dict, dict]) -> None:
    out, results, _ = finished
    for p in results["probes"]:
        lo, hi = p["bin"]
        train = json.loads((out / p["run_dir"] / "config.json").read_text())["train"]
        assert (train["mask_ratio_min"], train["mask_ratio_max"]) == (lo, hi)
        assert train["lr_schedule"] == "constant" and train["loss_weighting"] == "masked_mean"
        assert lo <= p["t_drawn"][0] <= p["t_drawn"][1] < hi  # the t the fine-tune actually drew
        # the realized ratio r = #masked / L is Binomial(L, t) / L: in the bin on average, over many rows
        noised = add_mask_noise(
            torch.zeros(512, SCALE.seq_len, dtype=torch.long),
            0,
            antithetic=train["antithetic"],
            generator=torch.Generator().manual_seed(0),
            t_min=lo,
            t_max=hi,
        )
        assert bool(((noised.t >= lo) & (noised.t < hi)).all())
        assert lo < float(noised.mask_ratio.mean()) < hi


def test_render_uses_only_the_archive_and_is_deterministic(finished: tuple[Path, dict, dict], tmp_path: Path) -> None:
    out, results, _ = finished
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in (RESULTS, "provenance.json"):
        shutil.copyfile(out / name, raw / name)
    first, second = render(raw), render(raw)
    assert first.markdown == second.markdown and first.series == second.series
    assert [p.name for p in first.plots] == ["efficiency.png", "same_bin.png", "ce_change.png"]
    assert json.loads(json.dumps(first.series)) == first.series  # strict JSON: what plots.json archives
    for v in results["summary"]["verdicts"]:
        assert Verdict(**v).line() in first.markdown
    assert "Ran on " in first.markdown and "Routed-experts-off control" in first.markdown
    assert "not like-for-like" in first.markdown  # the in-bin ratio is flagged as comparing different bins
    effs = results["per_bin"]
    assert first.series["efficiency"]["ten_times_highest_per_1M"] == pytest.approx(
        10 * 1e6 * effs[-1]["per_masked_token"]["mean"]
    )
    assert (out / SERIES).is_file()  # run rendered (and archived the series) from its own raw files


def test_efficiency_arithmetic_on_hand_made_numbers() -> None:
    eff = efficiency(3.0, 2.5, masked_tokens=100, tokens=400, steps=5)
    assert eff == pytest.approx({"delta_elbo": 0.5, "per_masked_token": 0.005, "per_step": 0.1, "per_token": 0.00125})
    assert ratio(0.4, 0.04) == pytest.approx(10.0) and math.isnan(ratio(0.4, 0.0)) and math.isnan(ratio(0.4, -1.0))
    before = [{"mask_ratio": [0.0, 0.1], "ce": 2.0}, {"mask_ratio": [0.9, 1.0], "ce": 5.0}]
    after = [{"mask_ratio": [0.0, 0.1], "ce": 1.5}, {"mask_ratio": [0.9, 1.0], "ce": 5.25}]
    change = ce_change(before, after)
    assert change[0] == 0.5 and change[9] == -0.25 and all(math.isnan(c) for c in change[1:9])
    with pytest.raises(ValueError, match="masked_tokens must be >= 1"):
        efficiency(3.0, 2.5, masked_tokens=0, tokens=400, steps=5)


def test_in_bin_efficiency_weights_the_validation_bins_inside_the_trained_bin() -> None:
    before = [
        {"mask_ratio": [0.0, 0.1], "ce": 2.0, "tokens": 10},
        {"mask_ratio": [0.1, 0.2], "ce": 3.0, "tokens": 30},
        {"mask_ratio": [0.2, 0.3], "ce": 4.0, "tokens": 50},
    ]
    after = [dict(b, ce=b["ce"] - d) for b, d in zip(before, (0.4, 0.2, 9.0), strict=True)]
    eff = in_bin_efficiency(before, after, (0.0, 0.2), masked_tokens=50, steps=4)
    assert eff["delta_ce_in_bin"] == pytest.approx((10 * 0.4 + 30 * 0.2) / 40)  # [0.2, 0.3) lies outside
    assert eff["in_bin_per_masked_token"] == pytest.approx(0.25 / 50)
    assert eff["in_bin_per_step"] == pytest.approx(0.25 / 4)
    assert math.isnan(in_bin_efficiency(before, after, (0.5, 1.0), masked_tokens=50, steps=4)["delta_ce_in_bin"])


def _probe(bin_: list[float], seed: int, delta: float, masked: int, delta_ce: list[float] | None = None) -> dict:
    """A hand-made probe record: ΔELBO `delta`, in-bin ΔCE 2·delta, per-bin ΔCE `delta_ce` (default delta)."""
    record = {"bin": bin_, "seed": seed, "delta_ce": delta_ce or [delta] * 10, "masked_tokens": masked, "steps": 10}
    in_bin = {"delta_ce_in_bin": 2 * delta, "in_bin_per_masked_token": 2 * delta / masked}
    in_bin["in_bin_per_step"] = 2 * delta / 10
    return record | efficiency(1.0, 1.0 - delta, masked_tokens=masked, tokens=1000, steps=10) | in_bin


def test_summary_on_hand_made_probes() -> None:
    low, high = [0.0, 0.5], [0.5, 1.0]
    probes = [_probe(low, 0, 0.2, 100), _probe(low, 1, 0.4, 100), _probe(high, 0, 0.1, 500), _probe(high, 1, 0.1, 500)]
    results = summarize(probes, [(0.0, 0.5), (0.5, 1.0)], {})
    per_bin, summary = results["per_bin"], results["summary"]
    assert per_bin[0]["per_masked_token"]["mean"] == pytest.approx(0.003)  # (0.002 + 0.004) / 2
    assert per_bin[0]["per_masked_token"]["std"] == pytest.approx(math.sqrt(2) * 0.001)
    assert per_bin[1]["masked_tokens_per_step"] == 50
    r = summary["ratio_lowest_to_highest"]
    assert r["per_masked_token"]["of_means"] == pytest.approx(0.003 / 0.0002)
    assert r["per_masked_token"]["per_seed"] == pytest.approx([10.0, 20.0])
    assert r["per_step"]["per_seed"] == pytest.approx([2.0, 4.0])
    assert r["in_bin_per_masked_token"]["per_seed"] == pytest.approx([10.0, 20.0])
    assert all(summary["low_mask_advantage"].values()) and len(summary["low_mask_advantage"]) == 5
    assert summary["equal_progress_ratio"] == pytest.approx(5.0)
    assert results["ce_change"]["delta_ce"][0] == pytest.approx([0.3] * 10)
    # the headline verdicts: per seed, (low − 10·high) and (low − high) per 1M masked tokens = (0, 2000), (1800, 3800)
    ten, one = summary["verdicts"]
    expected = verdict(ten["claim"], ten["measure"], [0.0, 2000.0])
    assert (ten["verdict"], ten["seeds"]) == (expected.verdict, 2) and ten["mean"] == pytest.approx(expected.mean)
    assert ten["ci95"] == pytest.approx(expected.ci95) and ten["seeds_needed"] == expected.seeds_needed
    assert one["mean"] == pytest.approx(2800.0) and one["seeds"] == 2 and summary["headline"] == "per_masked_token"


def test_same_bin_compares_the_probes_on_common_evaluated_bins() -> None:
    """The reviewer's case: the in-bin ratio (own bins) is large, on the same evaluated bins it is not."""
    low, high = [0.0, 0.5], [0.5, 1.0]
    nan = math.nan
    low_ce = [0.03, 0.02, 0.02, 0.01, 0.01, 0.0, 0.0, 0.0, 0.0, nan]  # bin [0.9, 1.0) of V is empty
    high_ce = [0.02, 0.02, 0.02, 0.02, 0.02, 0.05, 0.05, 0.05, 0.05, nan]
    probes = [_probe(low, s, 0.2, 100, [c * (1 + s / 10) for c in low_ce]) for s in range(3)]
    probes += [_probe(high, s, 0.1, 400, [c * (1 + s / 10) for c in high_ce]) for s in range(3)]
    same = same_bin(probes, [(0.0, 0.5), (0.5, 1.0)])
    assert same["per_masked_token"][0][0]["values"] == pytest.approx([0.03 / 100, 0.033 / 100, 0.036 / 100])
    assert same["per_masked_token"][1][0]["mean"] == pytest.approx(0.022 / 400)
    assert same["per_masked_token"][0][9] is None and same["lowest_vs_highest"][9]["verdicts"] == []
    first = same["lowest_vs_highest"][0]
    assert first["evaluated_bin"] == [0.0, 0.1]
    assert first["ratio_of_means"] == pytest.approx((0.033 / 100) / (0.022 / 400))  # 6×, not 10×
    assert first["ratio_per_seed"] == pytest.approx([6.0, 6.0, 6.0])
    ten, one = first["verdicts"]
    assert ten["verdict"] == CONTRADICTED and one["verdict"] == REPRODUCED  # 6× every seed: > 1×, < 10×
    assert same["lowest_vs_highest"][5]["ratio_of_means"] == 0.0  # the lowest bin did not move r ≥ 0.5


def test_claim_verdicts_on_constructed_efficiencies() -> None:
    high = [1e-6, 1.2e-6, 0.8e-6, 1.1e-6, 0.9e-6]
    order, weaker = claim_verdicts([12e-6, 13e-6, 11e-6, 12.5e-6, 11.5e-6], high, "ΔELBO")
    assert order.verdict == REPRODUCED and weaker.verdict == REPRODUCED and order.seeds == 5
    assert order.mean == pytest.approx(1e6 * (12e-6 - 10e-6)) and "10 × max(highest bin, 0)" in order.measure
    order, weaker = claim_verdicts([5e-6, 6e-6, 4e-6, 5.5e-6, 4.5e-6], high, "ΔELBO")
    assert order.verdict == CONTRADICTED and weaker.verdict == REPRODUCED  # 5×: more efficient, not 10×
    # the highest bin got worse in one seed: its ratio is undefined, the paired difference is not — the
    # order-of-magnitude claim then asks only that the lowest bin learned (12), not 12 + 10 (a loss is no gain)
    order, weaker = claim_verdicts([12e-6, 2e-6], [-1e-6, 1e-6], "ΔELBO")
    assert order.seeds == 2 and order.mean == pytest.approx((12 - 8) / 2) and order.verdict == INCONCLUSIVE
    assert order.seeds_needed is not None and f"≈ {order.seeds_needed} seeds" in order.line()
    assert weaker.mean == pytest.approx((13 + 1) / 2)
    # both bins got worse: never "an order of magnitude more efficient", however much worse the highest got
    order, weaker = claim_verdicts([-1e-6, -1.1e-6, -0.9e-6], [-5e-6, -6e-6, -4e-6], "ΔELBO")
    assert order.verdict == CONTRADICTED and weaker.verdict == REPRODUCED


def test_laptop_defaults_fit_the_budget() -> None:
    """Base 1200 steps (routed experts matter), probes 200 steps: 1200 + 25 × 200 steps ≈ 21 min at 0.2 s/step."""
    laptop = base_scale(ExperimentArgs(out=Path("unused")))
    assert (laptop.steps, laptop.eval_batches, default_steps(laptop.steps)) == (1200, 32, 200)
    steps = laptop.steps + 5 * 5 * default_steps(laptop.steps)  # 5 bins × 5 seeds
    assert steps * 0.2 / 60 < 45 - 10  # leaves ≥ 10 min for setup, evaluations and a busier machine


def test_bad_options_are_refused_before_anything_is_written(tiny_args) -> None:
    cases = [
        ({"extra": {"num_bins": 0}}, "num_bins must be >= 1"),
        ({"extra": {"bins": 3}}, r"unknown experiment options \['bins'\]"),
        ({"steps": 0}, "steps must be an int >= 1"),
        ({"jobs": 0}, "jobs must be an int from 1"),
        ({"base_run": "/no/such/run"}, "--base-run='/no/such/run' is not a run folder"),
    ]
    for kwargs, match in cases:
        args = tiny_args("bad", **kwargs)
        with pytest.raises(ValueError, match=match):
            run(args)
        assert not args.out.exists()
    assert mask_ratio_bins(4) == [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)]


def test_cli_prints_the_summary(finished: tuple[Path, dict, dict]) -> None:
    out, results, printed = finished
    assert printed == {"experiment": "learning-efficiency", "out": str(out), "summary": results["summary"]}


def test_planned_steps_count_the_base_and_every_probe(finished: tuple[Path, dict, dict]) -> None:
    out, _, _ = finished
    laptop = ExperimentArgs(out=Path("unused"), seeds=5)
    assert learning_efficiency.planned_steps(laptop) == {"base": 1200, "probes": 5 * 5 * 200}
    given = dataclasses.replace(laptop, base_run=str(out / "base"), steps=7, extra={"num_bins": 3})
    assert learning_efficiency.planned_steps(given) == {"probes": 3 * 5 * 7}
