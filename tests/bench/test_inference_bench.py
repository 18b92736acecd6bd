"""The inference benchmark runs end to end and prints the figures the issue names (tiny untrained model).

It is not a timed test: it checks the JSON contract (cases, keys, ratios, targets), not the speed.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dlmoe.precision import resolve_precision

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {
    "case",
    "ms",
    "baseline_ms",
    "speedup",
    "unique_experts",
    "baseline_unique_experts",
    "token_agreement",
    "moe_ms",
    "baseline_moe_ms",
    "tokens_per_s",
    "baseline_tokens_per_s",
    "elbo",
    "baseline_elbo",
    "elbo_change",
    "repeats",
    "targets",
    "target_met",
    "dtype",
    "dtype_reason",
}


@pytest.mark.slow
def test_inference_bench_quick_prints_one_json_object_per_case() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "inference.py"), "--quick", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    meta, cases, summary = rows[0], rows[1:-1], rows[-1]
    assert meta["meta"] is True
    assert meta["model"]["total_params"] > meta["model"]["active_params"] > 0
    assert len(meta["prompt_lengths"]) == 8 and len(set(meta["prompt_lengths"])) == 8
    assert [r["section"] for r in cases] == ["a"] * 3 + ["b"] * 4 + ["c"] * 2
    auto = resolve_precision("auto", "cpu")  # the default: bf16 only where this CPU runs it natively
    assert meta["model"]["dtype"] == auto.name
    for row in cases:
        assert row.keys() >= REQUIRED
        assert row["dtype"] == auto.name and row["dtype_reason"] == auto.reason
        assert row["ms"] > 0 and row["baseline_ms"] > 0
        assert row["speedup"] == pytest.approx(row["baseline_ms"] / row["ms"], rel=0.02, abs=2e-3)
        assert 0.0 <= row["token_agreement"] <= 1.0
        assert row["elbo_change"] == pytest.approx(row["elbo"] - row["baseline_elbo"], abs=2e-4)
        assert row["unique_experts"] > 0 and row["baseline_unique_experts"] > 0
        assert row["target_met"] in (True, False, None)
        assert (row["target_met"] is None) == (not row["targets"])
    block = [r for r in cases if r["section"] == "a"]
    assert all(r["targets"].keys() == {"unique_experts_reduction", "moe_speedup"} for r in block)
    assert all(r["num_forwards"] == r["baseline_num_forwards"] for r in block)  # same steps, routing only
    plain = {r["case"]: r for r in cases if r["section"] == "b"}
    assert plain["b/dual_cache+threshold_0.9"]["targets"] == {"speedup": 4.0}
    assert all(r["baseline"] == "plain" for r in plain.values())
    batch = [r for r in cases if r["section"] == "c"]
    assert all(r["tokens_per_s"] == pytest.approx(8 * 32 / r["ms"] * 1e3, rel=0.02) for r in batch)
    assert summary["summary"] is True and set(summary["targets_met"]) == {r["case"] for r in cases if r["targets"]}
