"""Forward noising of the absorbing-mask diffusion (LLaDA / MDLM).

Per sequence t_b ~ U(t_min, t_max), by default U(0, 1) (dMoE fine-tunes on [0.3, 0.8]); optionally
antithetic: evenly spaced with one shared random offset, which lowers the variance of the batch loss.
Each token is masked iid with probability t_b; a row with no masked token gets one at a random position.
The realized ratio r_b = #masked_b / L — not t_b — is what the loss weights by and what routers see as
the timestep.

Letters: B batch, L length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dlmoe._checks import check_float, check_int, check_tensor


@dataclass(frozen=True)
class NoisedBatch:
    """x_t with its mask and realized mask ratio."""

    noisy_ids: Tensor  # [B, L] int64: x_t (mask_id where masked)
    masked: Tensor  # [B, L] bool
    mask_ratio: Tensor  # [B] float32: r_b = #masked / L
    t: Tensor  # [B] float32: sampled masking probability


def sample_t(
    batch: int,
    *,
    antithetic: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    t_min: float = 0.0,
    t_max: float = 1.0,
) -> Tensor:
    """[B] masking probabilities in [t_min, t_max): iid uniform, or antithetic (stratified) over the batch.

    Draws u in [0, 1) and maps it affinely, so the strata stay strata of the range and the default
    range returns u itself (bit for bit: resumed runs repeat their noise)."""
    check_int("batch", batch, low=1)
    _check_range(t_min, t_max)
    if antithetic:
        offset = torch.rand((), generator=generator, device=device)
        u = (offset + torch.arange(batch, device=device) / batch) % 1.0
    else:
        u = torch.rand(batch, generator=generator, device=device)
    if (t_min, t_max) == (0.0, 1.0):
        return u
    return t_min + (t_max - t_min) * u


def _check_range(t_min: float, t_max: float) -> None:
    check_float("t_min", t_min, low=0.0, high=1.0, high_open=True)
    check_float("t_max", t_max, low=0.0, high=1.0, low_open=True)
    if t_min >= t_max:
        raise ValueError(f"t_min must be < t_max, got t_min={t_min}, t_max={t_max} (allowed: 0 <= t_min < t_max <= 1)")


def add_mask_noise(
    input_ids: Tensor,
    mask_id: int,
    *,
    t: Tensor | None = None,
    antithetic: bool = False,
    generator: torch.Generator | None = None,
    t_min: float = 0.0,
    t_max: float = 1.0,
) -> NoisedBatch:
    """Mask each token of row b with probability t_b (at least one per row); t_b drawn in [t_min, t_max)
    unless given."""
    input_ids = check_tensor("input_ids", input_ids, ndim=2, floating=False)
    batch, length = input_ids.shape
    if length < 1:
        raise ValueError(f"input_ids must have at least one position, got shape {tuple(input_ids.shape)}")
    device = input_ids.device
    if t is None:
        t = sample_t(batch, antithetic=antithetic, generator=generator, device=device, t_min=t_min, t_max=t_max)
    else:
        check_tensor("t", t, shape=(batch,), floating=True)
    masked = torch.rand(batch, length, generator=generator, device=device) < t[:, None]
    empty = ~masked.any(1)
    if bool(empty.any()):  # a row with nothing to predict teaches nothing: mask one position
        forced = torch.randint(0, length, (batch,), generator=generator, device=device)
        masked[empty, forced[empty]] = True
    noisy = torch.where(masked, torch.full_like(input_ids, mask_id), input_ids)
    return NoisedBatch(noisy, masked, masked.float().mean(1), t.float())
