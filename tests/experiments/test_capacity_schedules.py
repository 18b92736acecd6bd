"""`dlmoe experiment capacity-schedules` at a tiny scale: FLOPs matching, output contract, results doc."""

import dataclasses
import json

import pytest

from dlmoe.experiments.capacity_schedules import (
    STATIC,
    default_k_range,
    match_schedules,
    planned_steps,
    run,
    select_schedules,
)
from dlmoe.experiments.common import seed_stats
from dlmoe.experiments.raw_data import DOC_HEADER
from dlmoe.routing.schedules import SCHEDULE_NAMES
from tests.experiments.conftest import make_args

TINY_SHAPE = {"seq_len": 32, "num_experts": 4}
SCHEDULE_KEYS = {"k_min", "k_max", "expected_k", "static_expected_k", "relative_gap", "matched",
                 "measured_experts_per_token", "measured_vs_expected", "final_val_loss", "vs_static",
                 "exceeds_seed_spread", "bins", "runs", "rank"}  # fmt: skip


def test_default_k_range_keeps_ec_dlm_proportions():
    assert default_k_range(20, 512) == (8, 32)  # EC-DLM: [8, 32] around static k = 20
    assert default_k_range(2, 16) == (1, 3)
    assert default_k_range(4, 16) == (2, 6)
    assert default_k_range(8, 10) == (3, 10)  # capped at the number of experts


def test_bell_only_with_allow_unmatched():
    assert select_schedules(None, allow_unmatched=False) == [s for s in SCHEDULE_NAMES if s != "bell"]
    assert select_schedules(None, allow_unmatched=True) == list(SCHEDULE_NAMES)
    assert select_schedules(["linear", "constant", "linear"], allow_unmatched=False) == [STATIC, "linear"]
    with pytest.raises(ValueError, match="unknown"):
        select_schedules(["linear", "sawtooth"], allow_unmatched=False)


def test_flops_matching_refuses_more_than_one_percent():
    # k ∈ [1, 3] around k = 2 at L = 32: the rounded Gaussian bell is 1.5 % short of 2 experts per token
    matches = match_schedules(["linear", "linear_reverse"], 2, 1, 3, allow_unmatched=False, **TINY_SHAPE)
    assert all(m.matched for m in matches.values()) and matches[STATIC].expected_k == 2.0
    with pytest.raises(ValueError, match=r"gaussian: E\[k\] = 1\.9697 vs 2\.0000 \(-1\.52 %\).*--allow-unmatched"):
        match_schedules(["linear", "gaussian"], 2, 1, 3, allow_unmatched=False, **TINY_SHAPE)
    with pytest.raises(ValueError, match=r"linear: E\[k\] = 2\.4848 vs 2\.0000"):  # [1, 4]: ≈ 2.5 vs 2
        match_schedules(["linear"], 2, 1, 4, allow_unmatched=False, **TINY_SHAPE)
    loose = match_schedules(["gaussian", "bell"], 2, 1, 3, allow_unmatched=True, **TINY_SHAPE)
    assert not loose["gaussian"].matched and loose["gaussian"].relative_gap == pytest.approx(-0.0152, abs=1e-4)
    assert not loose["bell"].matched
    # at L = 128 (the laptop length) the same range matches every schedule but bell
    assert match_schedules(SCHEDULE_NAMES[:-1], 2, 1, 3, seq_len=128, num_experts=16, allow_unmatched=False)


@pytest.mark.parametrize(
    ("k_min", "k_max", "message"),
    [(2, 2, "k_min must be < k_max"), (3, 1, "k_min must be < k_max"), (0, 3, "k_min must be an int in"),
     (1, 5, "k_max must be an int in"), (1.0, 3, "k_min must be an int in")],
)  # fmt: skip
def test_bad_k_range(k_min, k_max, message):
    with pytest.raises(ValueError, match=message):
        match_schedules(["linear"], 2, k_min, k_max, allow_unmatched=False, **TINY_SHAPE)


def test_run_refuses_unmatched_before_writing(tiny_scale, corpus, tmp_path):
    args = make_args(tmp_path / "out", corpus, extra={"schedules": ["gaussian_reverse"]})
    with pytest.raises(ValueError, match="gaussian_reverse: E"):
        run(args)
    with pytest.raises(ValueError, match="bell"):  # asked for explicitly, still refused without allow_unmatched
        run(dataclasses.replace(args, extra={"schedules": ["bell"]}))
    assert not (tmp_path / "out").exists()


def test_seed_stats():
    one = seed_stats([2.0])
    assert one == {"mean": 2.0, "std": None, "ci95": None, "n": 1, "values": [2.0]}
    two = seed_stats([1.0, 3.0])
    assert two["mean"] == 2.0 and two["std"] == pytest.approx(2**0.5) and two["ci95"] == pytest.approx(12.706)


def test_end_to_end_two_seeds_then_overwrite(tiny_scale, corpus, tmp_path):
    out, doc = tmp_path / "out", tmp_path / "docs" / "results.md"
    doc.parent.mkdir()
    doc.write_text("# Results\n\nintro kept\n")
    args = make_args(out, corpus, seeds=2, results_doc=str(doc), extra={"schedules": ["linear_reverse"]})
    results = run(args)
    assert json.loads((out / "results.json").read_text()) == results
    assert results["static_k"] == 2 and results["k_range"] == [1, 3]
    assert set(results["schedules"]) == {STATIC, "linear_reverse"} and sorted(results["ranking"]) == sorted(
        results["schedules"]
    )
    for name, s in results["schedules"].items():
        assert set(s) >= SCHEDULE_KEYS, name
        assert s["matched"] and s["expected_k"] == pytest.approx(2.0)
        assert s["final_val_loss"]["n"] == 2 and len(s["runs"]) == 2
        assert s["bins"] and all(b["ce"]["n"] == 2 for b in s["bins"])
    static, rev = results["schedules"][STATIC], results["schedules"]["linear_reverse"]
    assert static["measured_experts_per_token"]["mean"] == pytest.approx(2.0)  # static EC: exactly E·C/L = k
    assert 1.0 <= rev["measured_experts_per_token"]["mean"] <= 3.0
    assert static["vs_static"] is None and static["exceeds_seed_spread"] is None
    assert rev["vs_static"]["n"] == 2 and isinstance(rev["exceeds_seed_spread"], bool)
    assert rev["vs_static"]["mean"] == pytest.approx(rev["final_val_loss"]["mean"] - static["final_val_loss"]["mean"])
    assert {r["rank"] for r in results["schedules"].values()} == {1, 2}
    for png in ("per_bin_loss.png", "final_loss.png"):  # drawn from the archived raw data
        assert (doc.parent / "results" / "capacity-schedules" / png).stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert "| rank | schedule | k range | E[k] | measured experts/token |" in md and "| Δ linear_reverse |" in md
    first = doc.read_text()
    # the doc is rendered whole from raw data: a hand-written intro is replaced by the generated header
    assert first.startswith(DOC_HEADER) and "intro kept" not in first
    assert first.count("<!-- experiment:capacity-schedules -->") == 1
    assert "2 seed(s)" in first

    with pytest.raises(ValueError, match="--overwrite"):
        run(dataclasses.replace(args, seeds=1))
    run(dataclasses.replace(args, seeds=1, overwrite=True))
    second = doc.read_text()
    assert second.count("<!-- experiment:capacity-schedules -->") == 1
    assert second.count("<!-- /experiment:capacity-schedules -->") == 1
    assert "1 seed(s)" in second and "2 seed(s)" not in second
    assert json.loads((out / "results.json").read_text())["options"]["seeds"] == 1


def test_screen_then_headline_on_fresh_seeds(tiny_scale, corpus, tmp_path):
    """Seed 0 screens every schedule; seeds 1..N compare static, linear_reverse and the screen's best other."""
    out, doc = tmp_path / "out", tmp_path / "docs" / "results.md"
    extra = {"schedules": ["linear_reverse", "linear", "cosine_reverse"], "screen": True}
    args = make_args(out, corpus, seeds=2, results_doc=str(doc), extra=extra)
    results = run(args)
    screen = results["screen"]
    assert set(screen["final_val_loss"]) == {STATIC, "linear_reverse", "linear", "cosine_reverse"}
    others = {n: v for n, v in screen["final_val_loss"].items() if n not in (STATIC, "linear_reverse")}
    assert screen["best_other"] == min(others, key=others.get)
    assert set(results["schedules"]) == {STATIC, "linear_reverse", screen["best_other"]}
    for s in results["schedules"].values():
        assert [r["seed"] for r in s["runs"]] == [1, 2]  # the screen's seed is not reused
    trained = sorted(p.parent.relative_to(out / "runs") for p in (out / "runs").rglob("metrics.csv"))
    assert len(trained) == 4 + 3 * 2 and sum(planned_steps(args).values()) == len(trained) * tiny_scale.steps
    text = doc.read_text()
    assert "Screen (seed 0, every FLOPs-matched schedule once)" in text
    assert "linear_reverse consistently achieves the best performance under matched FLOPs" in text
    series = json.loads((doc.parent / "results" / "capacity-schedules" / "plots.json").read_text())
    bins = series["per_bin_loss"]
    assert set(bins) == set(results["schedules"]) and len({b["colour"] for b in bins.values()}) == len(bins)
    for name, drawn in bins.items():  # each line is the schedule it is labelled with
        assert drawn["ce"] == [b["ce"]["mean"] for b in results["schedules"][name]["bins"]]


def test_screen_option_checked_before_writing(tiny_scale, corpus, tmp_path):
    with pytest.raises(ValueError, match="screen must be true or false"):
        run(make_args(tmp_path / "out", corpus, extra={"screen": "yes"}))
    with pytest.raises(ValueError, match="a screen needs"):
        run(make_args(tmp_path / "out", corpus, extra={"schedules": ["linear"], "screen": True}))
    assert not (tmp_path / "out").exists()
