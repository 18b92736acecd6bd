"""Input validation helpers: every message names the parameter, the value and what is allowed."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """`value` must be an int (not bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}" + _range_hint(low, high))
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}" + _range_hint(low, high))
    return value


def check_float(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """`value` must be a real number in the interval given (open or closed ends)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    interval = f"{'(' if low_open else '['}{'-inf' if low is None else low}, " + (
        f"{'inf' if high is None else high}{')' if high_open else ']'}"
    )
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high or value != value:
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def check_choice(name: str, value: object, allowed: Iterable[str]) -> str:
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value  # type: ignore[return-value]


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | None = None,
    floating: bool | None = None,
    shape: tuple[int | None, ...] | None = None,
) -> Tensor:
    """`value` must be a tensor of the given rank / kind / shape (None entries match any size)."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if floating is True and not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if floating is False and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got dtype {value.dtype}")
    if shape is not None:
        ok = value.ndim == len(shape) and all(s is None or s == v for s, v in zip(shape, value.shape, strict=False))
        if not ok:
            want = tuple("*" if s is None else s for s in shape)
            raise ValueError(f"{name} must have shape {want}, got {tuple(value.shape)}")
    return value


def _range_hint(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f" (allowed: {low}..{high})"
    return ""
