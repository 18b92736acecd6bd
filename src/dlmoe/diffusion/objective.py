"""The diffusion objective as one path: noise → single- or two-stream forward → loss.

Training (`Trainer._loss`), validation (`diffusion.validation`) and anything else that scores a batch
under the masked-diffusion objective go through `diffusion_loss`, so they cannot drift apart:
  - noise is drawn on the CPU from the given generator for the whole (global) batch, so it is
    identical on every device and every rank; `rows` then keeps this process's rows;
  - a two-stream (block-causal) model gets the clean stream x_0 as `clean_input_ids`, so each noisy
    block sees the clean earlier blocks, as the exact-cache sampler does; a single-stream model never;
  - autocast stays the caller's: `forward` is whatever the caller runs (plain model, DDP/FSDP module,
    a closure under `torch.autocast`); the loss is computed outside it, in float32.

Letters: B batch, L length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from dlmoe._checks import check_choice, check_int
from dlmoe.diffusion.loss import DiffusionLoss, masked_diffusion_loss
from dlmoe.diffusion.noise import NoisedBatch, add_mask_noise
from dlmoe.vocab import LOSS_WEIGHTINGS

# forward(noisy_ids, mask_ratio=..., [clean_input_ids=...]) -> an output with .logits, .aux_loss, .dispatches
Forward = Callable[..., Any]
RowSlicer = Callable[[Tensor], Tensor]  # this process's rows of a global batch (data parallelism)


class ObjectiveOutput(NamedTuple):
    """One batch under the objective (unpacks as (loss, aux_loss, dispatches, noised))."""

    loss: DiffusionLoss  # the diffusion loss of this process's rows
    aux_loss: Tensor  # router aux / z losses of the forward (0 in eval mode)
    dispatches: list  # per-layer routing of the forward
    noised: NoisedBatch  # this process's rows of the noised batch (on the CPU)


def diffusion_loss(
    forward: Forward,
    batch: Tensor,
    *,
    mask_id: int,
    two_stream: bool,
    generator: torch.Generator,
    t_min: float = 0.0,
    t_max: float = 1.0,
    antithetic: bool = True,
    weighting: str = "elbo",
    rows: RowSlicer | None = None,
    device: torch.device | str | None = None,
) -> ObjectiveOutput:
    """Noise `batch` [B, L] (t ~ U[t_min, t_max), drawn on the CPU from `generator`), run `forward` on
    this process's rows (`rows`, default all) on `device` (default: the batch's), and score it."""
    check_int("mask_id", mask_id, low=0)
    check_choice("weighting", weighting, LOSS_WEIGHTINGS)
    if not isinstance(two_stream, bool):
        raise ValueError(f"two_stream must be a bool (ModelConfig.block_causal), got {two_stream!r}")
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (noise is drawn on the CPU), got {generator!r}")
    if not isinstance(batch, Tensor):
        raise ValueError(f"batch must be a [B, L] tensor of token ids, got {type(batch).__name__}")
    dev = torch.device(device) if device is not None else batch.device
    batch = batch.cpu()
    noised = add_mask_noise(
        batch, mask_id, antithetic=antithetic, generator=generator, t_min=t_min, t_max=t_max
    )  # the whole batch's noise on every rank: each keeps its own rows
    if rows is not None:
        batch = rows(batch)
        noised = NoisedBatch(*(rows(getattr(noised, f.name)) for f in dataclasses.fields(noised)))
    clean = {"clean_input_ids": batch.to(dev)} if two_stream else {}
    out = forward(noised.noisy_ids.to(dev), mask_ratio=noised.mask_ratio.to(dev), **clean)
    diff = masked_diffusion_loss(
        out.logits, batch.to(dev), noised.masked.to(dev), noised.mask_ratio.to(dev), weighting=weighting
    )
    return ObjectiveOutput(diff, out.aux_loss, out.dispatches, noised)
