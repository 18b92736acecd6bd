"""Capacity schedules s(r), per-sample k(r), expected k and FLOPs matching."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dlmoe.routing.schedules import (
    DEFAULT_SIGMA,
    SCHEDULE_NAMES,
    dynamic_k,
    ec_capacity,
    expected_k,
    flops_match,
    schedule_value,
    solve_k_max,
)

MATCHED = [name for name in SCHEDULE_NAMES if name != "bell"]


def s_reference(name: str, r: float, sigma: float = DEFAULT_SIGMA) -> float:
    """DESIGN.md §5 table, in plain python floats."""
    e0 = math.exp(-1.0 / (8.0 * sigma**2))
    g = min(max((math.exp(-((r - 0.5) ** 2) / (2.0 * sigma**2)) - e0) / (1.0 - e0), 0.0), 1.0)
    return {
        "constant": 0.5,
        "linear": r,
        "linear_reverse": 1.0 - r,
        "cosine": (1.0 - math.cos(math.pi * r)) / 2.0,
        "cosine_reverse": (1.0 + math.cos(math.pi * r)) / 2.0,
        "gaussian": g,
        "gaussian_reverse": 1.0 - g,
        "bell": min(max(1.0 - 4.0 * (r - 0.5) ** 2, 0.0), 1.0),
    }[name]


def test_schedule_names() -> None:
    assert set(MATCHED) == {
        "constant",
        "linear",
        "linear_reverse",
        "cosine",
        "cosine_reverse",
        "gaussian",
        "gaussian_reverse",
    }


@pytest.mark.parametrize("name", MATCHED)
def test_expected_k_is_flops_matched(name: str) -> None:
    assert expected_k(name, 8, 32) == pytest.approx(20.0, abs=0.05)
    assert expected_k(name, 8, 32, seq_len=512) == pytest.approx(20.0, abs=0.05)


def test_bell_is_not_flops_matched() -> None:
    assert expected_k("bell", 8, 32) == pytest.approx(24.0, abs=0.05)
    assert expected_k("bell", 8, 32, seq_len=512) == pytest.approx(24.0, abs=0.05)
    assert not flops_match("bell", 8, 32, 20.0).matched


@given(
    st.sampled_from(SCHEDULE_NAMES),
    st.integers(1, 40),
    st.integers(0, 40),
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=16),
)
def test_dynamic_k_matches_formula(name: str, k_min: int, span: int, rs: list[float]) -> None:
    k_max = k_min + span
    r = torch.tensor(rs, dtype=torch.float64)
    k = dynamic_k(r, name, k_min, k_max)
    assert k.dtype == torch.int64 and k.shape == r.shape
    assert bool(((k >= k_min) & (k <= k_max)).all())
    for ri, ki in zip(rs, k.tolist(), strict=True):
        v = k_min + (k_max - k_min) * s_reference(name, ri)
        if abs(v - math.floor(v) - 0.5) < 1e-9:  # float rounding of s decides a half: either neighbour
            assert ki in (math.floor(v), math.ceil(v))
        else:
            assert ki == min(max(round(v), k_min), k_max)  # python round: half to even


def test_dynamic_k_rounds_half_to_even() -> None:
    r = torch.tensor([0.5, 0.5])
    assert dynamic_k(r[:1], "linear", 8, 9).tolist() == [8]  # 8.5 -> 8
    assert dynamic_k(r[:1], "linear", 9, 10).tolist() == [10]  # 9.5 -> 10
    assert dynamic_k(torch.tensor([0.25, 0.75]), "linear", 1, 3).tolist() == [2, 2]  # 1.5 -> 2, 2.5 -> 2


@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=32), st.integers(1, 16), st.integers(0, 32))
def test_linear_schedules_are_monotone(rs: list[float], k_min: int, span: int) -> None:
    r = torch.tensor(sorted(rs))
    up = dynamic_k(r, "linear", k_min, k_min + span)
    down = dynamic_k(r, "linear_reverse", k_min, k_min + span)
    assert bool((up[1:] >= up[:-1]).all())
    assert bool((down[1:] <= down[:-1]).all())
    assert dynamic_k(torch.tensor([0.0, 1.0]), "linear", k_min, k_min + span).tolist() == [k_min, k_min + span]
    assert dynamic_k(torch.tensor([0.0, 1.0]), "linear_reverse", k_min, k_min + span).tolist() == [
        k_min + span,
        k_min,
    ]


@pytest.mark.parametrize("r", [0.0, 0.1, 0.25, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_schedule_values(name: str, r: float) -> None:
    got = float(schedule_value(torch.tensor([r], dtype=torch.float64), name)[0])
    assert got == pytest.approx(s_reference(name, r), abs=1e-12)


def test_cosine_and_gaussian_points() -> None:
    r = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(schedule_value(r, "cosine"), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    torch.testing.assert_close(schedule_value(r, "cosine_reverse"), torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64))
    for sigma in (0.1, DEFAULT_SIGMA, 0.5):
        g = schedule_value(r, "gaussian", sigma=sigma)
        torch.testing.assert_close(g, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
        gr = schedule_value(r, "gaussian_reverse", sigma=sigma)
        torch.testing.assert_close(gr, torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64), atol=1e-12, rtol=0)
    # sigma = 0.22 makes the mean of g about 1/2
    grid = (torch.arange(100_000, dtype=torch.float64) + 0.5) / 100_000
    assert float(schedule_value(grid, "gaussian").mean()) == pytest.approx(0.5, abs=2e-3)
    # the sigma argument is honoured: a wider bell has a larger mean
    assert float(schedule_value(grid, "gaussian", sigma=0.4).mean()) > 0.55


def test_user_callable_schedule() -> None:
    r = torch.tensor([0.0, 0.5, 1.0])
    assert dynamic_k(r, lambda x: x**2, 4, 12).tolist() == [4, 6, 12]
    # E[round(3 + 3r²)] = 3 + Σ_j P(3r² ≥ j − ½) = 3 + Σ_{j=1..3} (1 − sqrt((j − ½)/3)): rounding included
    exact = 3 + sum(1 - math.sqrt((j - 0.5) / 3) for j in (1, 2, 3))
    assert expected_k(lambda x: x**2, 3, 6) == pytest.approx(exact, abs=1e-4)
    assert abs(exact - 4.0) > 0.02  # differs from the unrounded 3 + 3·E[r²] = 4
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dynamic_k(r, lambda x: 2 * x, 4, 12)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        dynamic_k(r, lambda x: x - 0.5, 4, 12)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_k(lambda x: x + 1, 4, 12)


@pytest.mark.parametrize("name", SCHEDULE_NAMES)
def test_expected_k_monte_carlo(name: str) -> None:
    # 200k uniform samples of r, one per equal-width stratum (still uniform; far smaller error than iid)
    n = 200_000
    g = torch.Generator().manual_seed(1234)
    r = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=g, dtype=torch.float64)) / n
    mc = dynamic_k(r, name, 8, 32).double().mean().item()
    assert mc == pytest.approx(expected_k(name, 8, 32), abs=0.02)


def test_expected_k_monte_carlo_iid() -> None:
    n = 200_000
    r = torch.rand(n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    mc = dynamic_k(r, "cosine", 8, 32).double().mean().item()
    assert mc == pytest.approx(expected_k("cosine", 8, 32), abs=5 * 7.1 / math.sqrt(n))  # 5 sigma


def test_flops_match() -> None:
    m = flops_match("linear", 8, 32, 20)
    assert m.matched and m.relative_gap == pytest.approx(0.0, abs=1e-3)
    assert m.expected_k == pytest.approx(20.0, abs=1e-3)
    bad = flops_match("linear", 8, 30, 20)
    assert not bad.matched
    assert bad.relative_gap == pytest.approx(-0.05, abs=1e-3)
    assert flops_match("linear", 8, 30, 20, tolerance=0.06).matched
    assert flops_match("gaussian", 8, 32, 20).matched
    assert flops_match("bell", 8, 32, 24).matched


def test_solve_k_max() -> None:
    m = solve_k_max("linear", 8, 20)
    assert m.k_max == 32 and m.matched
    assert solve_k_max("linear_reverse", 8, 20).k_max == 32
    assert solve_k_max("bell", 8, 24).k_max == 32
    assert solve_k_max("linear", 4, 10).k_max == 16
    assert solve_k_max("linear", 8, 20, seq_len=64).k_max == 32


def test_expected_k_includes_capacity_floor() -> None:
    # L=16, E=64: C = max(⌊16k/64⌋, 1) = 1 for k <= 3, i.e. 64·1/16 = 4 active experts per token
    assert expected_k("linear", 1, 3) == pytest.approx(2.0, abs=0.01)
    assert expected_k("linear", 1, 3, seq_len=16, num_experts=64) == pytest.approx(4.0, abs=1e-9)
    assert expected_k("constant", 2, 2, seq_len=16, num_experts=64) == pytest.approx(4.0, abs=1e-9)
    # no floor when L·k/E is a whole number >= 1: active experts = k
    assert expected_k("linear", 8, 32, seq_len=512, num_experts=64) == pytest.approx(
        expected_k("linear", 8, 32, seq_len=512), abs=1e-9
    )
    # floor(L·k/E) truncation lowers the active experts: L=10, E=8, k=4 -> C=5, 8·5/10 = 4; k=3 -> C=3 -> 2.4
    assert expected_k("constant", 3, 3, seq_len=10, num_experts=8) == pytest.approx(2.4, abs=1e-9)
    assert ec_capacity(torch.tensor([1, 3, 4]), 10, 8).tolist() == [1, 3, 5]


def test_k_is_rounded_in_float32_as_ec_dlm_does() -> None:
    # linear_reverse, k ∈ [2, 14] (EC-DLM's Nemotron script), r = 23/24: 2 + 12·(1 − r) rounds to 2 in float64
    # and to 3 in float32; EC-DLM's mask ratio and schedule are float32 tensors, so it gets 3, and so do we
    r64 = torch.tensor([23 / 24], dtype=torch.float64)
    assert torch.round(2 + 12 * (1 - r64)).item() == 2
    for dtype in (torch.float32, torch.float64):
        assert dynamic_k(r64.to(dtype), "linear_reverse", 2, 14).tolist() == [3]
    # EC-DLM's reference rule written out: float32 r, float32 s, torch.round
    L = 6 * 7
    r32 = torch.arange(1, L + 1, dtype=torch.float32) / L
    for name, s32 in {
        "linear": r32,
        "linear_reverse": 1.0 - r32,
        "cosine": 0.5 * (1.0 + torch.cos(math.pi * (1.0 - r32))),
        "cosine_reverse": 0.5 * (1.0 + torch.cos(math.pi * r32)),
    }.items():
        reference = torch.round(1 + (4 - 1) * s32).clamp(1, 4).to(torch.int64)
        assert torch.equal(dynamic_k(r32, name, 1, 4), reference), name


def test_expected_k_sums_the_k_that_dynamic_k_applies() -> None:
    L = 60  # many half-integer landings for k ∈ [1, 4]
    m = torch.arange(1, L + 1, dtype=torch.float64)
    weights = torch.full((L,), 1.0 / (L + 1), dtype=torch.float64)
    weights[0] += 1.0 / (L + 1)  # a row with no masked token gets one
    for name in ("linear", "linear_reverse", "cosine", "cosine_reverse", "gaussian"):
        k = dynamic_k((m / L).to(torch.float32), name, 1, 4).to(torch.float64)
        assert expected_k(name, 1, 4, seq_len=L) == pytest.approx(float((k * weights).sum()), abs=1e-12), name
