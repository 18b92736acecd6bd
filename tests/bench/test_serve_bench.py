"""The serve benchmark runs end to end on a tiny model served on loopback and prints the figures the issue names.

It is not a timed test: it checks the JSON contract (every case, its fields, the baselines next to
it, the summary and its targets) and what does not depend on the machine (no failed request, every
batched and unbatched answer equal to a direct `generate` of its prompt), not the speed.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'dlmoe[serve]')")
pytest.importorskip("httpx", reason="the bench's clients need httpx (the dev extra)")

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {
    "case", "clients", "batching", "requests", "failed", "tokens_per_s", "p50_ms", "p99_ms", "mean_batch_rows",
    "mean_batch_rows_per_request", "identical", "mismatches", "batching_off_tokens_per_s", "speedup", "cut_short",
}  # fmt: skip


@pytest.mark.slow
def test_serve_bench_quick_prints_every_case_and_the_targets() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "serve.py"), "--quick", "--threads", "1"],
        capture_output=True, text=True, timeout=600, check=True, cwd=ROOT,
    )  # fmt: skip
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    meta, cases, summary = rows[0], rows[1:-1], rows[-1]
    assert meta["meta"] is True and meta["host"] == "127.0.0.1" and meta["settings"]["temperature"] == 0.0
    assert meta["model"]["router"] == "expert_choice" and len(set(meta["prompt_tokens"])) == len(meta["prompt_tokens"])
    assert {(r["clients"], r["batching"]) for r in cases} == {(c, b) for c in (1, 4, 16) for b in (False, True)}
    for row in cases:
        assert row.keys() >= REQUIRED
        assert row["requests"] == meta["requests_per_case"] and row["failed"] == 0 and not row["cut_short"]
        assert row["identical"] is True and row["mismatches"] == 0
        assert row["tokens_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"]
        off = next(r for r in cases if r["clients"] == row["clients"] and not r["batching"])
        assert row["batching_off_tokens_per_s"] == off["tokens_per_s"]
        assert row["speedup"] == pytest.approx(row["tokens_per_s"] / off["tokens_per_s"], rel=0.01)
        if not row["batching"]:
            assert row["mean_batch_rows"] == row["mean_batch_rows_per_request"] == 1.0
        else:
            assert 1.0 <= row["mean_batch_rows"] <= row["mean_batch_rows_per_request"] <= 16
    on16 = next(r for r in cases if r["clients"] == 16 and r["batching"])
    assert on16["mean_batch_rows"] > 1  # 16 closed-loop clients do share generate calls
    assert summary["case"] == "summary" and summary["speedup_16_clients"] == on16["speedup"]
    assert summary["targets"] == {"speedup_16_clients": 2.5, "failed": 0, "identical": True}
    assert summary["targets_met"]["failed"] is True and summary["targets_met"]["identical"] is True
    assert set(summary["targets_met"]) == set(summary["targets"])
