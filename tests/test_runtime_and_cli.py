"""Process-level helpers and the command line."""

import json

import pytest
import torch

from dlmoe import runtime
from dlmoe.cli import main


def test_tune_cpu_malloc_is_idempotent_and_keeps_torch_working(monkeypatch: pytest.MonkeyPatch) -> None:
    first = runtime.tune_cpu_malloc()
    assert runtime.tune_cpu_malloc() == first
    x = torch.randn(1 << 20)
    assert torch.equal(x.clone(), x)  # large allocations still behave


def test_tune_cpu_malloc_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_tuned", False)
    monkeypatch.setenv("DLMOE_NO_MALLOC_TUNING", "1")
    assert runtime.tune_cpu_malloc() is False


def test_routing_demo_prints_stats_for_every_router(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["routing-demo", "--experts", "8", "--k", "2", "--dim", "16", "--hidden", "8", "--length", "32"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    routers = [r for r in rows if "router" in r]
    assert {r["router"] for r in routers} >= {"expert_choice", "token_choice(dropless)", "block_routing(p=0.6)"}
    for r in routers:
        assert r["experts_per_token_mean"] == pytest.approx(2.0, abs=0.6)
    ec = next(r for r in routers if r["router"] == "expert_choice")
    assert ec["load_max_over_mean"] == pytest.approx(1.0)  # EC is balanced by construction


def test_routing_demo_bad_input_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["routing-demo", "--experts", "4", "--k", "9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dlmoe: error:") and "num_experts_per_tok" in err
