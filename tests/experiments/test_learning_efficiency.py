"""`dlmoe experiment learning-efficiency` at a tiny scale: output contract, bin restriction, arithmetic, CLI."""

import contextlib
import dataclasses
import io
import json
import math
from pathlib import Path

import pytest
import torch

from dlmoe.cli import main
from dlmoe.diffusion.noise import add_mask_noise
from dlmoe.experiments import SCALES, learning_efficiency
from dlmoe.experiments.learning_efficiency import (
    ce_change,
    efficiency,
    in_bin_efficiency,
    mask_ratio_bins,
    ratio,
    run,
    summarize,
)
from tests.experiments.conftest import TINY

SCALE = dataclasses.replace(TINY, steps=2, eval_batches=1)
RESULT_KEYS = {"experiment", "settings", "probes", "per_bin", "ce_change", "summary"}
SUMMARY_KEYS = {
    "lowest_bin",
    "highest_bin",
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
    assert results["settings"]["base_trained_here"] and results["settings"]["base_router"] == "expert_choice"
    assert len(results["probes"]) == 4 and [b["bin"] for b in results["per_bin"]] == [[0.0, 0.5], [0.5, 1.0]]
    for b in results["per_bin"]:
        assert set(b) == {
            "bin",
            "masked_tokens_per_step",
            "delta_elbo",
            "delta_ce_in_bin",
            *learning_efficiency.VARIANTS,
        }
        assert (
            set(b["per_masked_token"]) == {"mean", "std", "ci95", "n", "values"}
            and b["per_masked_token"]["std"] is not None
        )
    assert len(results["ce_change"]["delta_ce"]) == 2 and all(len(r) == 10 for r in results["ce_change"]["delta_ce"])
    for name in ("efficiency.png", "ce_change.png"):
        assert (out / name).stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert md.startswith("## learning-efficiency") and "per 1M masked tok" in md and "![efficiency]" in md
    assert not list((out / "runs").glob("*/checkpoints")) and not list((out / "runs").glob("*/model"))


def test_probes_are_measured_against_one_start_and_count_masked_tokens(finished: tuple[Path, dict, dict]) -> None:
    _, results, _ = finished
    before = results["settings"]["elbo_before"]
    for p in results["probes"]:
        assert p["steps"] == 1 and p["tokens"] == SCALE.batch_size * SCALE.seq_len
        assert 0 < p["masked_tokens"] <= p["tokens"]
        assert p["delta_elbo"] == pytest.approx(before - p["elbo_after"])
        assert p["per_masked_token"] == pytest.approx(p["delta_elbo"] / p["masked_tokens"])


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
    assert eff["in_bin_per_masked_token"] == pytest.approx(0.25 / 50) and eff["in_bin_per_step"] == pytest.approx(
        0.25 / 4
    )
    assert math.isnan(in_bin_efficiency(before, after, (0.5, 1.0), masked_tokens=50, steps=4)["delta_ce_in_bin"])


def test_summary_on_hand_made_probes() -> None:
    def probe(bin_: list[float], seed: int, delta: float, masked: int) -> dict:
        record = {"bin": bin_, "seed": seed, "delta_ce": [delta] * 10, "masked_tokens": masked, "steps": 10}
        in_bin = {"delta_ce_in_bin": 2 * delta, "in_bin_per_masked_token": 2 * delta / masked}
        in_bin["in_bin_per_step"] = 2 * delta / 10
        return record | efficiency(1.0, 1.0 - delta, masked_tokens=masked, tokens=1000, steps=10) | in_bin

    low, high = [0.0, 0.5], [0.5, 1.0]
    probes = [probe(low, 0, 0.2, 100), probe(low, 1, 0.4, 100), probe(high, 0, 0.1, 500), probe(high, 1, 0.1, 500)]
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


def test_bad_options_are_refused_before_anything_is_written(tiny_args) -> None:
    cases = [
        ({"extra": {"num_bins": 0}}, "num_bins must be >= 1"),
        ({"extra": {"bins": 3}}, r"unknown experiment options \['bins'\]"),
        ({"steps": 0}, "steps must be an int >= 1"),
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
