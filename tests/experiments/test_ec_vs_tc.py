"""`dlmoe experiment ec-vs-tc` at a tiny scale: output contract, results doc, refusals, time-to-loss logic."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

from dlmoe.cli import main
from dlmoe.experiments import SCALES
from dlmoe.experiments.common import VariantRun
from dlmoe.experiments.ec_vs_tc import (
    TC_VARIANTS,
    VARIANTS,
    Reach,
    aggregate_comparisons,
    compare_to_tc,
    run,
    time_to_reach,
)
from dlmoe.experiments.raw_data import render_doc
from tests.experiments.conftest import make_args

CURVE = [(10.0, 1.0, 5.0), (20.0, 2.0, 4.0), (30.0, 4.0, 3.0)]  # (step, train seconds, validation loss)
STATS_KEYS = {"mean", "std", "ci95", "n", "values"}
VARIANT_KEYS = {"description", "overrides", "active_flops_per_token", "final_val_loss", "train_s",
                "tokens_per_s", "load_max_over_mean", "dropped_fraction", "zero_expert_fraction",
                "experts_per_token", "vs_ec", "runs"}  # fmt: skip
COMPARISON_KEYS = {"target_val_loss", "tc_train_s", "ec_train_s", "speedup", "step_speedup", "reached", "reason",
                   "per_seed"}  # fmt: skip


def test_time_to_reach_interpolates_between_evaluations():
    assert time_to_reach(CURVE, 3.5) == Reach(25.0, 3.0, False)  # halfway from (20, 2 s, 4.0) to (30, 4 s, 3.0)
    assert time_to_reach(CURVE, 4.0) == Reach(20.0, 2.0, False)  # reached exactly at an evaluation
    assert time_to_reach(CURVE, 4.75) == Reach(12.5, 1.25, False)
    assert time_to_reach(CURVE, 6.0) == Reach(10.0, 1.0, True)  # already below at the first evaluation: a bound
    assert time_to_reach(CURVE, 2.9) is None
    # not monotone: the first crossing counts
    assert time_to_reach([(1.0, 1.0, 5.0), (2.0, 2.0, 3.0), (3.0, 3.0, 6.0), (4.0, 4.0, 2.0)], 4.0).step == 1.5


def _run(name: str, seed: int, curve: list[tuple[float, float, float]]) -> VariantRun:
    rows = [{"step": s, "train_s": t, "val_loss": v} for s, t, v in curve]
    return VariantRun(name, seed, Path(name), rows, [])


def test_wall_clock_ratio_per_seed_and_aggregated():
    ec = _run("ec", 0, CURVE)
    tc = _run("tc", 0, [(10.0, 2.0, 5.5), (20.0, 4.0, 4.5), (30.0, 6.0, 3.5)])  # final loss 3.5 after 6 s, 30 steps
    one = compare_to_tc(ec, tc)
    assert one["target_val_loss"] == 3.5 and one["tc_train_s"] == 6.0
    assert one["ec_train_s"] == 3.0 and one["ec_steps"] == 25.0
    assert one["speedup"] == 2.0 and one["step_speedup"] == pytest.approx(30 / 25)
    assert one["reason"] is None
    never = compare_to_tc(ec, _run("tc", 1, [(10.0, 2.0, 2.5)]))  # TC ends below anything EC reaches
    assert never["speedup"] is None and never["ec_train_s"] is None and "3.0000 stays above 2.5000" in never["reason"]
    both = aggregate_comparisons([one, never])
    assert both["reached"] == "1/2" and both["speedup"]["mean"] == 2.0 and "seeds [1]" in both["reason"]
    none = aggregate_comparisons([never])
    assert none["speedup"] is None and none["ec_train_s"] is None and none["reason"].startswith("seed 1:")


@pytest.fixture(scope="module")
def cli_run(tiny_scale, corpus, tmp_path_factory):
    """One real run through the `dlmoe` CLI (tiny scale, 1 seed, 3 steps): 4 variants."""
    tmp = tmp_path_factory.mktemp("ec_vs_tc")
    out, doc = tmp / "out", tmp / "docs" / "results.md"
    argv = ["experiment", "ec-vs-tc", "--out", str(out), "--scale", "tiny", "--corpus", str(corpus), "--seeds", "1",
            "--steps", "3", "--results-doc", str(doc)]  # fmt: skip
    assert main(argv) == 0
    return out, doc, argv


def test_output_folder_contract(cli_run):
    out, doc, _ = cli_run
    record = json.loads((out / "experiment.json").read_text())
    assert record["experiment"] == "ec-vs-tc" and record["options"]["steps"] == 3
    assert record["options"]["scaling_factor"] is True  # EC-DLM's scripts: shared experts + scaling factor
    results = json.loads((out / "results.json").read_text())  # strict JSON: no NaN
    assert set(results["variants"]) == set(VARIANTS)
    for name, v in results["variants"].items():
        assert set(v) >= VARIANT_KEYS, name
        assert set(v["final_val_loss"]) >= STATS_KEYS and v["final_val_loss"]["n"] == 1
        assert math.isfinite(v["final_val_loss"]["mean"]) and v["tokens_per_s"]["mean"] > 0
        (only,) = v["runs"]
        assert [p["step"] for p in only["curve"]] == [1.0, 2.0, 3.0]
        assert (out / only["run_dir"] / "metrics.csv").is_file()
        assert not (out / only["run_dir"] / "checkpoints").exists()
        router = json.loads((out / only["run_dir"] / "config.json").read_text())["model"]["moe"]["router"]
        assert router["scaling_factor"] is True, name
    ec, tc_cf = results["variants"]["ec"], results["variants"]["tc_aux_cf1.25"]
    assert ec["load_max_over_mean"]["mean"] == pytest.approx(1.0)  # EC: every expert takes C tokens
    assert ec["experts_per_token"]["mean"] == pytest.approx(2.0) and ec["dropped_fraction"]["mean"] == 0.0
    assert tc_cf["experts_per_token"]["mean"] <= 2.0
    assert ec["vs_ec"] is None
    assert tc_cf["vs_ec"]["mean"] == pytest.approx(tc_cf["final_val_loss"]["mean"] - ec["final_val_loss"]["mean"])
    assert len({v["active_flops_per_token"] for v in results["variants"].values()}) == 1  # equal active FLOPs
    assert set(results["time_to_tc_loss"]) == set(TC_VARIANTS)
    for c in results["time_to_tc_loss"].values():
        assert set(c) >= COMPARISON_KEYS
        assert c["speedup"] is None or c["speedup"]["mean"] > 0
        assert (c["speedup"] is None) == (c["reason"] is not None and c["reached"] == "0/1")
    assert set(results["summary"]) == {"final_val_loss", "speedup", "step_speedup"}
    for name, per_seed in results["controls"].items():  # the routed-experts-off control of every run
        (control,) = per_seed
        assert control["routed_contribution"] == pytest.approx(control["val_elbo_routed_off"] - control["val_elbo"])
        assert control["val_elbo"] == pytest.approx(results["variants"][name]["final_val_loss"]["mean"], rel=1e-5)
    md = (out / "results.md").read_text()
    assert "| variant | router | final val loss | Δ vs ec |" in md and "| TC variant |" in md
    assert "Routed-experts-off control" in md and "— EC trains to a lower validation loss than" in md
    raw = doc.parent / "results" / "ec-vs-tc"  # the raw data the doc section is rendered from
    for png in ("val_loss.png", "routing.png"):
        assert (raw / png).stat().st_size > 1000
    provenance = json.loads((raw / "provenance.json").read_text())
    assert set(provenance) >= {"git", "command", "torch", "dtype", "cpu", "threads", "load_before", "load_after"}
    assert provenance["command"] and provenance["load_before"]["cores"] >= 1  # this process's command line
    for name in VARIANTS:
        files = {p.name for p in (raw / "runs" / name / "seed0").iterdir()}
        assert files == {"metrics.csv", "val_bins.json", "config.json"}
    assert json.loads((raw / "results.json").read_text()) == results
    text = doc.read_text()
    assert text.count("<!-- experiment:ec-vs-tc -->") == 1 and "| tc_bias_dropless |" in text
    assert "![val_loss](results/ec-vs-tc/val_loss.png)" in text
    assert set(results["tuning"]) == {"aux_loss_coef", "bias_update_rate"}  # the baselines' short-horizon sweep
    assert results["tuning"]["aux_loss_coef"]["chosen"] in (0.001, 0.01, 0.1)
    assert "Baselines tuned for this horizon" in text
    for knob, variant in (("aux_loss_coef", "tc_aux_dropless"), ("bias_update_rate", "tc_bias_dropless")):
        # the chosen value's tuning run is the tuned variant's seed 0 (same overrides and seed): not trained twice
        chosen = raw / "runs" / f"tune_{knob}_{results['tuning'][knob]['chosen']}" / "seed0" / "metrics.csv"
        assert (raw / "runs" / variant / "seed0" / "metrics.csv").read_bytes() == chosen.read_bytes()
    assert json.loads((raw / "runs" / "tc_aux_cf1.25" / "seed0" / "config.json").read_text())["run_dir"].endswith(
        "tc_aux_cf1.25/seed0"
    )  # trained for itself
    # the section is a function of the archived files alone: re-rendering gives the same text and series
    series = json.loads((raw / "plots.json").read_text())
    assert render_doc(doc) == ["ec-vs-tc"] and doc.read_text() == text
    assert json.loads((raw / "plots.json").read_text()) == series and set(series) == {"val_loss", "routing"}


def test_second_run_without_overwrite_is_refused(cli_run, capsys):
    out, _, argv = cli_run
    before = (out / "results.json").read_text()
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before


def test_ec_capacity_floor_mismatch_refused(tiny_scale, corpus, tmp_path, monkeypatch):
    # C = ⌊L·k/E⌋ = ⌊31·2/4⌋ = 15 → E·C/L = 60/31 ≈ 1.935 experts per token, not 2: unequal FLOPs
    monkeypatch.setitem(SCALES, "odd", dataclasses.replace(tiny_scale, seq_len=31))
    args = dataclasses.replace(make_args(tmp_path / "out", corpus), scale_name="odd")
    with pytest.raises(ValueError, match="1.935 active experts per token"):
        run(args)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [({"seeds": 0}, "seeds must be an int >= 1"), ({"steps": 0}, "steps must be an int >= 1"),
     ({"scale_name": "huge"}, "scale must be one of"), ({"extra": {"k_min": 1}}, "unknown experiment options")],
)  # fmt: skip
def test_bad_options(tiny_scale, corpus, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        run(dataclasses.replace(make_args(tmp_path / "out", corpus), **change))
    assert not (tmp_path / "out").exists()


def test_gpu_scale_without_cuda_is_refused_before_writing(tiny_scale, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        run(dataclasses.replace(make_args(tmp_path / "out", corpus), scale_name="gpu"))
    assert not (tmp_path / "out").exists()


def test_the_ablation_trains_without_the_scaling_factor_into_its_own_section(tiny_scale, corpus, tmp_path):
    doc = tmp_path / "results.md"
    args = dataclasses.replace(make_args(tmp_path / "out", corpus), steps=1, scaling_factor=False, results_doc=str(doc))
    results = run(args)
    assert results["options"]["scaling_factor"] is False
    for v in results["variants"].values():
        config = json.loads((tmp_path / "out" / v["runs"][0]["run_dir"] / "config.json").read_text())
        assert config["model"]["moe"]["router"]["scaling_factor"] is False
    assert "<!-- experiment:ec-vs-tc-no-scaling-factor -->" in doc.read_text()
