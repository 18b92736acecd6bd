"""The benchmark script runs end to end and prints the figures the issue names (tiny shapes).

It is not a timed test: it checks the JSON contract, not the speed.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {"case", "dtype", "pass", "ms", "dense_ms", "efficiency", "speedup_vs_transformers"}


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
    assert len(cases) == 4 * 2 * 2  # routers × dtypes × passes
    for row in cases:
        assert row.keys() >= REQUIRED
        assert row["ms"] > 0 and row["dense_ms"] > 0
        assert row["efficiency"] == pytest.approx(row["dense_ms"] / row["ms"], rel=0.02, abs=2e-3)
        assert row["speedup_vs_transformers"] == pytest.approx(row["transformers_ms"] / row["ms"], rel=0.02, abs=2e-3)
    assert {r["pass"] for r in cases} == {"fwd", "fwd+bwd"}
    assert {r["dtype"] for r in cases} == {"bfloat16", "float32"}
