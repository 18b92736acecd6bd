"""The offload benchmark runs end to end at its small scale and prints the figures issue 16 names.

It is not a timed test: it checks the JSON contract and the properties that do not depend on the
machine (offloaded generations bit-identical to resident ones, the budget honoured, every case there).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASE_KEYS = {"case", "expert_memory", "peak_rss_bytes", "tokens_per_s", "bytes_per_token", "loads_per_token",
             "hit_rate"}  # fmt: skip


@pytest.mark.slow
def test_offload_bench_small_prints_every_case_and_the_targets(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "offload.py"), "--scale", "small", "--workdir", str(tmp_path)],
        check=True, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith('{"case"')]
    cases = ["token/resident", "token/offload", "block/resident", "block/offload", "summary"]
    assert [r["case"] for r in rows] == cases
    for row in rows[:4]:
        assert set(row) >= CASE_KEYS and row["peak_rss_bytes"] > row["baseline_rss_bytes"] > 0
    for row in (rows[1], rows[3]):
        assert row["bit_identical"] is True and row["expert_memory"] == "512KiB"
        assert row["peak_expert_bytes"] <= 512 * 1024 and 0 <= row["hit_rate"] <= 1
        assert row["dense_bytes"] < rows[0]["dense_bytes"]  # the routed experts are not parameters
    assert rows[3]["unique_experts"] < rows[1]["unique_experts"]  # the coreset is smaller than token routing's
    summary = rows[-1]
    assert summary["bit_identical"] is True and summary["bytes_per_token_token_over_block"] > 1
    assert {"rss_within_dense_plus_budget_plus_15pct", "bytes_target_met", "speed_target_met"} <= set(summary)


def test_a_bad_budget_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "offload.py"), "--scale", "small", "--workdir", str(tmp_path),
         "--expert-memory", "lots"], capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert out.returncode != 0 and "is not a size" in out.stderr and not any(tmp_path.iterdir())
