"""The benchmark script runs end to end and prints the figures the issue names (tiny shapes).

It is not a timed test: it checks the JSON contract, not the speed.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dlmoe.precision import resolve_precision

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {"case", "dtype", "dtype_reason", "pass", "ms", "dense_ms", "efficiency", "speedup_vs_transformers"}


@pytest.mark.slow
def test_moe_layer_bench_quick_prints_one_json_object_per_case() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "moe_layer.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    meta, cases = rows[0], rows[1:]
    assert meta["meta"] is True
    assert len(cases) == 4 * 1 * 2  # routers × dtypes (default: auto only) × passes
    for row in cases:
        assert row.keys() >= REQUIRED
        assert row["ms"] > 0 and row["dense_ms"] > 0
        assert row["efficiency"] == pytest.approx(row["dense_ms"] / row["ms"], rel=0.02, abs=2e-3)
        assert row["speedup_vs_transformers"] == pytest.approx(row["transformers_ms"] / row["ms"], rel=0.02, abs=2e-3)
    assert {r["pass"] for r in cases} == {"fwd", "fwd+bwd"}
    auto = resolve_precision("auto", "cpu")  # bf16 only where this CPU runs it natively
    assert {r["dtype"] for r in cases} == {str(auto.dtype).removeprefix("torch.")}
    assert {r["dtype_reason"] for r in cases} == {auto.reason}


@pytest.mark.slow
def test_moe_layer_bench_runs_bf16_rows_on_request() -> None:
    """`--dtypes bfloat16 float32`: both, each with its reason (on a CPU without native bf16, bf16 warns)."""
    cmd = [sys.executable, str(ROOT / "bench" / "moe_layer.py"), "--quick", "--routers", "ec", "--passes", "fwd"]
    cmd += ["--dtypes", "bfloat16", "float32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    cases = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()][1:]
    assert [r["dtype"] for r in cases] == ["bfloat16", "float32"]
    assert [r["dtype_reason"].split(" ")[:2] for r in cases] == [["bf16", "requested"], ["fp32", "requested"]]
    assert ("emulated" in proc.stderr) == (resolve_precision("auto", "cpu").name != "bf16")
