"""Masked-diffusion ELBO loss and its per-mask-ratio breakdown.

    loss = (1 / (B·L)) Σ_b (1 / r_b) Σ_{i masked} CE(x_i | x_t)        (ELBO, LLaDA / EC-DLM)

with r_b the realized mask ratio; "stable" drops the 1/r_b weight (EC-DLM's
--difflm-stable-training); "masked_mean" is dMoE's fine-tuning objective, the plain mean CE over the
masked tokens of the batch, Σ_b Σ_{i masked} CE / #masked (not a bound: report the ELBO beside it).
The per-bin view reports, for each mask-ratio bin, the mean CE over masked tokens (what EC-DLM logs
as per-bin validation loss).

Letters: B batch, L length, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dlmoe._checks import check_choice, check_int
from dlmoe.vocab import LOSS_WEIGHTINGS as WEIGHTINGS


@dataclass(frozen=True)
class DiffusionLoss:
    loss: Tensor  # scalar: the objective (before router losses)
    token_ce: Tensor  # [B, L] float32 CE, 0 where not masked
    num_masked: Tensor  # scalar int


def masked_diffusion_loss(
    logits_BLV: Tensor, targets_BL: Tensor, masked_BL: Tensor, mask_ratio_B: Tensor, *, weighting: str = "elbo"
) -> DiffusionLoss:
    """ELBO (or stable, unweighted) masked-token cross-entropy normalised by all B·L tokens, or
    (masked_mean) by the number of masked tokens."""
    check_choice("weighting", weighting, WEIGHTINGS)
    batch, length, vocab = logits_BLV.shape
    ce_BL = F.cross_entropy(logits_BLV.float().reshape(-1, vocab), targets_BL.reshape(-1), reduction="none")
    ce_BL = ce_BL.view(batch, length) * masked_BL
    per_row = ce_BL.sum(1)
    if weighting == "masked_mean":
        num_masked = masked_BL.sum()
        return DiffusionLoss(per_row.sum() / num_masked.clamp_min(1), ce_BL, num_masked)
    if weighting == "elbo":
        per_row = per_row / mask_ratio_B.clamp_min(1.0 / length)
    return DiffusionLoss(per_row.sum() / (batch * length), ce_BL, masked_BL.sum())


def loss_by_mask_ratio_bin(
    token_ce_BL: Tensor, masked_BL: Tensor, mask_ratio_B: Tensor, num_bins: int = 10
) -> tuple[Tensor, Tensor]:
    """Sum of masked-token CE and masked-token count per equal-width bin of r: ([bins], [bins]).

    Accumulate both over a validation set, then divide: the mean CE per masked token in each bin.
    """
    check_int("num_bins", num_bins, low=1)
    bins_B = (mask_ratio_B.clamp(0, 1) * num_bins).long().clamp_max(num_bins - 1)
    ce_sum = torch.zeros(num_bins, dtype=torch.float64, device=token_ce_BL.device)
    count = torch.zeros(num_bins, dtype=torch.float64, device=token_ce_BL.device)
    ce_sum.index_add_(0, bins_B, token_ce_BL.sum(1).double())
    count.index_add_(0, bins_B, masked_BL.sum(1).double())
    return ce_sum, count
