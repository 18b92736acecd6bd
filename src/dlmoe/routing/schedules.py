"""Timestep-dependent expert capacity for expert-choice routing (EC-DLM §3).

A schedule maps the realized mask ratio r ∈ [0, 1] of a sequence to s(r) ∈ [0, 1]; the number
of experts per token for that sequence is

    k_b = clamp(round(k_min + (k_max − k_min) · s(r_b)), k_min, k_max)      (round half to even, in float32)

and its EC capacity is C_b = max(⌊L·k_b/E⌋, 1) (`dlmoe.routing.capacity`). With r ~ U(0, 1) every
built-in schedule except "bell" has E[s] = ½, so k ∈ [8, 32] matches a static k = 20 in expected
FLOPs. `expected_k` computes that expectation exactly (rounding included) so a FLOPs match can be
checked, not assumed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from dlmoe import vocab
from dlmoe._checks import check_float, check_int, check_tensor
from dlmoe.routing.capacity import ec_capacity as _ec_capacity

ScheduleFn = Callable[[Tensor], Tensor]
DEFAULT_SIGMA = 0.22  # makes ∫₀¹ g(r) dr ≈ ½, i.e. FLOPs-matched with the other schedules


def _gaussian(r: Tensor, sigma: float) -> Tensor:
    e0 = math.exp(-1.0 / (8.0 * sigma**2))  # g(0) = g(1) = 0 after the shift
    g = (torch.exp(-((r - 0.5) ** 2) / (2.0 * sigma**2)) - e0) / (1.0 - e0)
    return g.clamp(0.0, 1.0)


SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "constant": lambda r, sigma: torch.full_like(r, 0.5),
    "linear": lambda r, sigma: r,
    "linear_reverse": lambda r, sigma: 1.0 - r,
    "cosine": lambda r, sigma: 0.5 * (1.0 + torch.cos(math.pi * (1.0 - r))),  # = (1 − cos πr)/2, as EC-DLM codes it
    "cosine_reverse": lambda r, sigma: 0.5 * (1.0 + torch.cos(math.pi * r)),
    "gaussian": lambda r, sigma: _gaussian(r, sigma),
    "gaussian_reverse": lambda r, sigma: 1.0 - _gaussian(r, sigma),
    # EC-DLM's unused "bell": E[s] = 2/3, so it is *not* FLOPs-matched with the others.
    "bell": lambda r, sigma: (1.0 - 4.0 * (r - 0.5) ** 2).clamp(0.0, 1.0),
}
SCHEDULE_NAMES = tuple(SCHEDULES)
assert SCHEDULE_NAMES == vocab.SCHEDULE_NAMES, "dlmoe.vocab.CapacitySchedule must list every schedule"


def validate_schedule(schedule: str | ScheduleFn, sigma: float = DEFAULT_SIGMA) -> None:
    """Raise ValueError for an unknown schedule name or a bad σ."""
    if callable(schedule):
        return
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be a callable or one of {list(SCHEDULE_NAMES)}, got {schedule!r}")
    if schedule.startswith("gaussian"):
        check_float("sigma", sigma, low=0.0, low_open=True)


def schedule_value(r: Tensor, schedule: str | ScheduleFn, *, sigma: float = DEFAULT_SIGMA) -> Tensor:
    """s(r) in [0, 1] for a named schedule or a user callable (checked to stay in [0, 1])."""
    validate_schedule(schedule, sigma)
    r = r.to(torch.float64)
    s = schedule(r) if callable(schedule) else SCHEDULES[schedule](r, sigma)
    if not isinstance(s, Tensor) or s.shape != r.shape:
        raise ValueError("a callable schedule must map a tensor r to a tensor s(r) of the same shape")
    s = s.to(torch.float64)
    if bool(((s < -1e-9) | (s > 1 + 1e-9) | torch.isnan(s)).any()):
        raise ValueError("a callable schedule must return values in [0, 1]")
    return s.clamp(0.0, 1.0)


def _check_k_range(k_min: int, k_max: int) -> None:
    check_int("k_min", k_min, low=1)
    check_int("k_max", k_max, low=1)
    if k_min > k_max:
        raise ValueError(f"k_min must be <= k_max, got k_min={k_min}, k_max={k_max}")


def dynamic_k(
    r: Tensor,
    schedule: str | ScheduleFn,
    k_min: int,
    k_max: int,
    *,
    sigma: float = DEFAULT_SIGMA,
) -> Tensor:
    """Per-sample experts-per-token k_b from the mask ratio r_b.

    Args:
        r: [B] float, realized mask ratio of each sequence, in [0, 1].
    Returns:
        [B] int64 in [k_min, k_max].
    """
    _check_k_range(k_min, k_max)
    check_mask_ratio(r)
    return _round_k(r, schedule, k_min, k_max, sigma).to(torch.int64)


def check_mask_ratio(r: object) -> Tensor:
    """`r` must be a [B] float tensor in [0, 1] (reads a flag from the device)."""
    r = check_tensor("r (mask ratio)", r, ndim=1, floating=True)
    if bool(((r < 0) | (r > 1) | torch.isnan(r)).any()):
        raise ValueError(f"r (mask ratio) must lie in [0, 1], got min {r.min().item()}, max {r.max().item()}")
    return r


def _round_k(r: Tensor, schedule: str | ScheduleFn, k_min: int, k_max: int, sigma: float) -> Tensor:
    """k = clamp(round(k_min + (k_max − k_min)·s(r)), k_min, k_max), evaluated in float32 as EC-DLM
    does (its mask ratio and schedule are fp32 tensors): where k_min + Δk·s(r) lands on a half
    integer, float64 and float32 can round to neighbours (linear_reverse, k ∈ [2, 14], r = 23/24:
    2 in float64, 3 in float32). `torch.round` rounds half to even, as in EC-DLM."""
    if callable(schedule):  # a user's schedule: checked to stay in [0, 1] there
        s = schedule_value(r, schedule, sigma=sigma).to(torch.float32)
    else:
        validate_schedule(schedule, sigma)
        s = SCHEDULES[schedule](r.to(torch.float32), sigma).clamp(0.0, 1.0)
    return torch.round(k_min + (k_max - k_min) * s).clamp(k_min, k_max)


def ec_capacity(k: Tensor | int, seq_len: int, num_experts: int) -> Tensor:
    """EC capacity per sequence, C = min(max(⌊L·k/E⌋, 1), L), elementwise over k (`capacity.ec_capacity`)."""
    return _ec_capacity(torch.as_tensor(k, dtype=torch.int64), seq_len, num_experts)  # type: ignore[return-value]


def _ratio_grid(seq_len: int | None, num_points: int) -> tuple[Tensor, Tensor]:
    """Points and weights of r under t ~ U(0, 1).

    Continuous r: midpoint rule on `num_points` cells (error ≤ jumps·Δk/num_points).
    Realized r = m/L with m ~ Binomial(L, t): m is exactly uniform on {0..L} (Beta-binomial(1,1));
    a row with no masked token gets one, so m = 0 moves to m = 1.
    """
    if seq_len is None:
        r = (torch.arange(num_points, dtype=torch.float64) + 0.5) / num_points
        return r, torch.full_like(r, 1.0 / num_points)
    check_int("seq_len", seq_len, low=1)
    m = torch.arange(1, seq_len + 1, dtype=torch.float64)
    w = torch.full_like(m, 1.0 / (seq_len + 1))
    w[0] += 1.0 / (seq_len + 1)
    return m / seq_len, w


def expected_k(
    schedule: str | ScheduleFn,
    k_min: int,
    k_max: int,
    *,
    sigma: float = DEFAULT_SIGMA,
    seq_len: int | None = None,
    num_experts: int | None = None,
    num_points: int = 1 << 20,
) -> float:
    """E[k] over r ~ U(0, 1), including the rounding of k.

    With `seq_len`, r is the realized ratio of a Binomial mask (exact sum over m). With
    `seq_len` and `num_experts`, the EC capacity floor is included too: it returns the expected
    *active* experts per token E[E·C_b/L] with C_b = max(⌊L·k_b/E⌋, 1).
    """
    _check_k_range(k_min, k_max)
    r, w = _ratio_grid(seq_len, num_points)
    k = _round_k(r, schedule, k_min, k_max, sigma).to(torch.float64)  # the rule `dynamic_k` applies
    if num_experts is not None:
        if seq_len is None:
            raise ValueError("expected_k: num_experts needs seq_len (capacity is ⌊L·k/E⌋)")
        check_int("num_experts", num_experts, low=1)
        k = ec_capacity(k.to(torch.int64), seq_len, num_experts).to(torch.float64) * num_experts / seq_len
    return float((k * w).sum())


@dataclass(frozen=True)
class FlopsMatch:
    """Outcome of comparing a capacity schedule with a static k at equal expected FLOPs."""

    schedule: str
    k_min: int
    k_max: int
    expected_k: float
    static_k: float
    relative_gap: float  # (E[k] − static_k) / static_k
    matched: bool

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def flops_match(
    schedule: str | ScheduleFn,
    k_min: int,
    k_max: int,
    static_k: float,
    *,
    tolerance: float = 0.01,
    **kwargs: object,
) -> FlopsMatch:
    """Check that a schedule's expected experts per token matches `static_k` within `tolerance`.

    Active expert FLOPs per token are proportional to experts per token, so this is the FLOPs match.
    Extra keyword arguments go to `expected_k` (sigma, seq_len, num_experts).
    """
    check_float("static_k", static_k, low=0.0, low_open=True)
    check_float("tolerance", tolerance, low=0.0)
    ek = expected_k(schedule, k_min, k_max, **kwargs)  # type: ignore[arg-type]
    gap = (ek - static_k) / static_k
    name = schedule if isinstance(schedule, str) else getattr(schedule, "__name__", "callable")
    return FlopsMatch(name, k_min, k_max, ek, float(static_k), gap, abs(gap) <= tolerance)


def solve_k_max(
    schedule: str | ScheduleFn,
    k_min: int,
    static_k: float,
    *,
    k_limit: int = 1024,
    **kwargs: object,
) -> FlopsMatch:
    """The integer k_max ≥ k_min whose expected k is closest to `static_k` (FLOPs-matched range)."""
    check_int("k_min", k_min, low=1)
    check_float("static_k", static_k, low=float(k_min))
    search_kwargs = {**kwargs, "num_points": min(int(kwargs.get("num_points", 1 << 16)), 1 << 16)}  # type: ignore[call-overload]
    best: FlopsMatch | None = None
    for k_max in range(k_min, k_limit + 1):
        m = flops_match(schedule, k_min, k_max, static_k, **search_kwargs)
        if best is None or abs(m.relative_gap) < abs(best.relative_gap):
            best = m
        if m.expected_k > static_k and m.relative_gap > abs(best.relative_gap):
            break  # E[k] grows with k_max: past the target, nothing better follows
    assert best is not None
    return flops_match(schedule, best.k_min, best.k_max, static_k, **kwargs)
