"""The training-step benchmark runs end to end and prints the figures the issue names (tiny shapes).

It is not a timed test: it checks the JSON contract, not the speed.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dlmoe.precision import resolve_precision

ROOT = Path(__file__).resolve().parents[2]
CASES = {"ec", "ec_linear_reverse", "tc_cf1.25", "tc_dropless", "dense"}
REQUIRED = {
    "case",
    "dtype",
    "dtype_reason",
    "ms",
    "ms_std",
    "baseline_ms",
    "ratio",
    "tokens_per_s",
    "baseline_tokens_per_s",
    "active_params",
    "total_params",
}


@pytest.mark.slow
def test_train_step_bench_quick_prints_one_json_object_per_case() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_step.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    meta, cases, summary = rows[0], rows[1:-1], rows[-1]
    assert meta["meta"] is True
    assert meta["schedule"]["k_min"] <= meta["shapes"]["k"] <= meta["schedule"]["k_max"]

    by_case = {row["case"]: row for row in cases}
    assert len(by_case) == len(cases) and set(by_case) == CASES
    dense = by_case["dense"]
    assert dense["active_params"] == dense["total_params"]
    assert dense["ratio"] == pytest.approx(1.0, abs=2e-3)
    auto = resolve_precision("auto", "cpu")  # the default: bf16 only where this CPU runs it natively
    for row in cases:
        assert row.keys() >= REQUIRED
        assert row["dtype"] == auto.name and row["dtype_reason"] == auto.reason
        assert row["ms"] > 0 and row["baseline_ms"] > 0 and row["ms_std"] >= 0
        assert row["baseline_ms"] == dense["ms"]
        assert row["ratio"] == pytest.approx(row["baseline_ms"] / row["ms"], rel=0.02, abs=2e-3)
        tokens = meta["shapes"]["batch"] * meta["shapes"]["seq_len"]
        assert row["tokens_per_s"] == pytest.approx(tokens / row["ms"] * 1e3, rel=0.02)
        assert row["baseline_tokens_per_s"] == pytest.approx(dense["tokens_per_s"], rel=0.02)
        assert 0 < row["active_params"] <= row["total_params"]
        assert math.isfinite(row["loss"])
    for name in CASES - {"dense"}:
        row = by_case[name]
        assert row["total_params"] > dense["total_params"]  # E experts vs one FFN of width k·F
        assert row["active_params"] == pytest.approx(dense["active_params"], rel=0.05)  # same active FFN params
        assert row["expected_k"] == pytest.approx(meta["shapes"]["k"], rel=0.05)

    assert summary["summary"] is True
    assert summary["ec_over_tc_dropless"] == pytest.approx(
        by_case["ec"]["ms"] / by_case["tc_dropless"]["ms"], rel=0.02, abs=2e-3
    )
    assert summary["ec_over_tc_cf1.25"] == pytest.approx(
        by_case["ec"]["ms"] / by_case["tc_cf1.25"]["ms"], rel=0.02, abs=2e-3
    )
