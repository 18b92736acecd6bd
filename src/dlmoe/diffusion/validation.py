"""The validation ELBO: one evaluator for training, `dlmoe eval --validation` and the experiments.

Fixed noise (`VALIDATION_SEED`) over fixed batches, t ~ U(0, 1) (what the ELBO integrates over,
whatever range training draws from), the 1/r-weighted `elbo` loss (an upper bound on the NLL, even
for runs that train on "stable" or "masked_mean"), antithetic t as the run trains (`train.antithetic`).
Each batch goes through `objective.diffusion_loss`, so two-stream (block-causal) models are scored
as they train: each noisy block against the clean earlier blocks.

Reported: nats/token (the mean of the batches' ELBOs), the mean masked-token CE per equal-width
mask-ratio bin (what `val_bins.json` holds), and through `bounds` bits/byte and the perplexity bound.
Under data parallelism a `runtime` (the trainer's) gives this rank's rows, averages the batch
losses and sums the bins over ranks; a batch with fewer rows than ranks (a short last batch) is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from dlmoe._checks import check_int
from dlmoe.diffusion.bounds import bits_per_byte, perplexity_bound
from dlmoe.diffusion.loss import loss_by_mask_ratio_bin
from dlmoe.diffusion.objective import Forward, diffusion_loss

VALIDATION_SEED = 1234  # the validation noise: the same draws at every evaluation of every run
NUM_BINS = 10  # equal-width mask-ratio bins of the per-bin breakdown (val_bins.json)


class Reduction(Protocol):
    """What a data-parallel evaluation needs from the runtime (`train.distributed.LocalRuntime` fits)."""

    world_size: int

    def local_rows(self, batch: Tensor) -> Tensor: ...

    def mean(self, values: list[float]) -> list[float]: ...

    def sum(self, x: Tensor) -> Tensor: ...


class SingleProcess:
    """One process: all rows, nothing to reduce."""

    world_size = 1

    def local_rows(self, batch: Tensor) -> Tensor:
        return batch

    def mean(self, values: list[float]) -> list[float]:
        return values

    def sum(self, x: Tensor) -> Tensor:
        return x


@dataclass(frozen=True)
class ValidationElbo:
    """The validation ELBO of a model and its breakdown by mask ratio."""

    nats_per_token: float  # mean over the scored batches of the batch ELBO (nats per token)
    bins: list[dict[str, Any]]  # {"mask_ratio": [lo, hi], "ce": mean masked-token CE, "tokens": count}
    batches: int  # batches scored (short last batches under data parallelism are skipped)

    @property
    def ppl_upper_bound(self) -> float:
        return perplexity_bound(self.nats_per_token)

    def bits_per_byte(self, bytes_per_token: float) -> float:
        return bits_per_byte(self.nats_per_token, bytes_per_token)


@torch.no_grad()
def validation_elbo(
    forward: Forward,
    batches: Iterable[Tensor],
    *,
    mask_id: int,
    two_stream: bool,
    antithetic: bool,
    seed: int = VALIDATION_SEED,
    device: torch.device | str | None = None,
    runtime: Reduction | None = None,
    num_bins: int = NUM_BINS,
) -> ValidationElbo:
    """Score `batches` ([B, L] token ids) with `forward` (in eval mode, under the caller's autocast)
    on fixed noise drawn from `seed`; `two_stream` is the model's `ModelConfig.block_causal`."""
    check_int("seed", seed)
    check_int("num_bins", num_bins, low=1)
    runtime = runtime if runtime is not None else SingleProcess()
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    ce_sum = torch.zeros(num_bins, dtype=torch.float64)
    count = torch.zeros(num_bins, dtype=torch.float64)
    for batch in batches:
        if batch.shape[0] < runtime.world_size:  # a short last batch: no row for some rank
            continue
        diff, _, _, noised = diffusion_loss(
            forward, batch, mask_id=mask_id, two_stream=two_stream, generator=generator, antithetic=antithetic,
            weighting="elbo", rows=runtime.local_rows, device=device,
        )  # fmt: skip
        losses.append(diff.loss.item())
        bin_ce, bin_n = loss_by_mask_ratio_bin(diff.token_ce.cpu(), noised.masked, noised.mask_ratio, num_bins)
        ce_sum, count = ce_sum + bin_ce, count + bin_n
    if not losses:
        raise ValueError(f"no validation batch to score: every batch has fewer rows than {runtime.world_size}")
    # ranks score equal slices of each batch: the mean of their losses is the global batch's
    losses = runtime.mean(losses)
    ce_sum, count = runtime.sum(ce_sum), runtime.sum(count)
    bins = [
        {"mask_ratio": [i / num_bins, (i + 1) / num_bins], "ce": (ce_sum[i] / count[i]).item(), "tokens": int(count[i])}
        for i in range(num_bins)
        if count[i] > 0
    ]
    return ValidationElbo(sum(losses) / len(losses), bins, len(losses))
