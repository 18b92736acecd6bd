"""The distributed benchmark launches torchrun (2 gloo ranks) per case and prints the figures the issue names.

It is not a timed test: it checks the JSON contract (cases, keys, ratios, all_to_all only under EP=2), not
the speed. Four torchrun launches take ~45 s on 2 CPU cores.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from dlmoe.precision import resolve_precision

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {
    "router",
    "expert_parallel",
    "world_size",
    "data_parallel",
    "dtype",
    "dtype_reason",
    "step_ms_mean",
    "step_ms_std",
    "tokens_per_s",
    "all_to_all_ms_per_step",
    "all_to_all_fraction",
    "rank_load_max_over_mean",
    "expert_load_max_over_mean",
    "device",
}


@pytest.mark.slow
def test_distributed_bench_quick_prints_every_case_and_the_ratios(tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    cmd = [sys.executable, str(ROOT / "bench" / "distributed.py"), "--quick", "--out", str(out)]
    cmd += ["--case-timeout", "60", "--collective-timeout", "60"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert out.read_text().splitlines() == proc.stdout.splitlines()  # --out holds the same lines
    meta = rows[0]
    cases = [r for r in rows if "case" in r]
    summaries = [r for r in rows if r.get("summary")]
    assert meta["meta"] is True and meta["world_size"] == 2
    assert len(rows) == 1 + len(cases) + len(summaries)

    auto = resolve_precision("auto", "cpu")  # the default: bf16 only where this CPU runs it natively
    by_case = {(r["router"], r["expert_parallel"]): r for r in cases}
    assert set(by_case) == {(router, ep) for router in ("expert_choice", "token_choice") for ep in (1, 2)}
    for (_, ep), row in by_case.items():
        assert row.keys() >= REQUIRED
        assert row["world_size"] == 2 and row["data_parallel"] == "ddp" and row["dtype"] == auto.name
        assert row["dtype_reason"] == auto.reason
        assert row["device"] == "cpu (1 threads per rank)"
        for key in ("step_ms_mean", "tokens_per_s", "rank_load_max_over_mean", "expert_load_max_over_mean"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert math.isfinite(row["step_ms_std"]) and row["step_ms_std"] >= 0
        assert math.isfinite(row["loss"])
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["step_ms_mean"] * 1e3, rel=0.01)
        assert row["rank_load_max_over_mean"] >= 1.0 and row["expert_load_max_over_mean"] >= 1.0
        if ep == 2:
            assert row["all_to_all_ms_per_step"] > 0 and 0 < row["all_to_all_fraction"] < 1
            assert row["rank_load_basis"] == "ep_ranks"
        else:
            assert row["all_to_all_ms_per_step"] == 0 and row["all_to_all_fraction"] == 0
            assert row["rank_load_basis"] == "as_if_ep2"
    for router in ("expert_choice", "token_choice"):  # EP=2 holds half the experts, the same dense weights
        one, two = by_case[router, 1], by_case[router, 2]
        assert two["expert_param_mib_per_rank"] == pytest.approx(one["expert_param_mib_per_rank"] / 2, abs=1e-3)
        dense_one = one["param_mib_per_rank"] - one["expert_param_mib_per_rank"]
        assert two["param_mib_per_rank"] - two["expert_param_mib_per_rank"] == pytest.approx(dense_one, abs=1e-3)
    # expert choice (pool sequence) gives every expert the same rows: no rank waits on another
    assert by_case["expert_choice", 2]["rank_load_max_over_mean"] == pytest.approx(1.0)
    assert by_case["expert_choice", 2]["expert_load_max_over_mean"] == pytest.approx(1.0)

    ep_ratios = {s["router"]: s for s in summaries if s["comparison"] == "ep2_over_ep1"}
    assert set(ep_ratios) == {"expert_choice", "token_choice"}
    for router, summary in ep_ratios.items():
        expected = by_case[router, 2]["tokens_per_s"] / by_case[router, 1]["tokens_per_s"]
        assert summary["tokens_per_s_ep2_over_ep1"] == pytest.approx(expected, rel=0.01, abs=2e-3)
    (ec_tc,) = [s for s in summaries if s["comparison"] == "ec_over_tc_at_ep2"]
    ec, tc = by_case["expert_choice", 2], by_case["token_choice", 2]
    assert ec_tc["ec_over_tc_step_time_at_ep2"] == pytest.approx(ec["step_ms_mean"] / tc["step_ms_mean"], abs=2e-3)
    assert ec_tc["ec_rank_load_max_over_mean"] == ec["rank_load_max_over_mean"]
    assert ec_tc["tc_rank_load_max_over_mean"] == tc["rank_load_max_over_mean"]
