"""What a generation cost: forwards, tokens fed, active FLOPs and unique experts (dMoE's metric).

Unique experts per layer per forward (dMoE): for each denoising forward and MoE layer, the number
of distinct routed experts used by the tokens of the current decoding block of a row (shared
experts excluded), averaged over layers, forwards and rows. `unique_experts_fed` counts the same
over every real token the forward processed — the expert weights it had to read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from dlmoe.routing.dispatch import Dispatch


@dataclass(frozen=True)
class GenerationStats:
    num_forwards: int  # model calls (a CFG call runs both branches in one batch)
    denoising_forwards: int  # calls whose logits chose commits (the others only filled a cache)
    tokens_fed: int  # Σ rows × fed length over calls
    generated_tokens: int  # B × G
    active_flops: float  # matmul FLOPs actually run (measured routed slots)
    unique_experts: float | None  # dMoE metric, per layer per denoising forward, over the block
    unique_experts_fed: float | None  # same over every real fed token
    unique_experts_by_layer: list[float] | None  # dMoE metric per MoE layer
    experts_per_token: float | None  # routed slots / real fed tokens
    seconds: float  # wall time of the loop
    # offloaded experts (`dlmoe.offload`; None when every expert is resident), over this generation:
    expert_loads: int | None = None  # experts read from disk when a forward needed them
    expert_hits: int | None = None  # needed experts found in the cache
    expert_prefetched: int | None = None  # experts read ahead on the background thread
    expert_bytes_read: int | None = None  # by both
    expert_load_seconds: float | None = None  # wall time spent reading (both threads)
    peak_expert_bytes: int | None = None  # the most expert bytes held at once
    expert_set_change_rate: float | None = None  # store lifetime: forwards whose layer's expert set changed

    @property
    def active_flops_per_token(self) -> float:
        return self.active_flops / max(self.generated_tokens, 1)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else float("inf")

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__) | {
            "active_flops_per_token": self.active_flops_per_token,
            "tokens_per_second": self.tokens_per_second,
        }


@dataclass
class StatsRecorder:
    """Accumulates per-call figures; `finish()` turns them into `GenerationStats`."""

    num_forwards: int = 0
    denoising_forwards: int = 0
    tokens_fed: int = 0
    active_flops: float = 0.0
    slots: int = 0
    real_tokens: int = 0
    unique_block_sum: Tensor | None = None  # [layers] float64, summed over denoising forwards and rows
    unique_fed_sum: Tensor | None = None
    unique_rows: int = 0
    _layers: list[int] = field(default_factory=list)

    def record(
        self,
        *,
        rows: int,
        fed_length: int,
        flops: float,
        dispatches: list[Dispatch],
        fed_valid_BL: Tensor,
        block_columns_BL: Tensor | None,
        num_rows: int,
    ) -> None:
        """One model call. `block_columns_BL` marks the current block's fed columns when the call's
        logits choose commits (None for cache-only calls); `num_rows` conditional rows are counted."""
        self.num_forwards += 1
        self.tokens_fed += rows * fed_length
        self.active_flops += flops
        if not dispatches:
            return
        self.slots += sum(d.num_slots for d in dispatches) // len(dispatches)
        self.real_tokens += int(fed_valid_BL.sum())
        if block_columns_BL is None:
            return
        self.denoising_forwards += 1
        block = torch.stack([d.unique_experts(block_columns_BL)[:num_rows] for d in dispatches]).double()
        fed = torch.stack([d.unique_experts(fed_valid_BL)[:num_rows] for d in dispatches]).double()
        self.unique_block_sum = block.sum(1) + (0 if self.unique_block_sum is None else self.unique_block_sum)
        self.unique_fed_sum = fed.sum(1) + (0 if self.unique_fed_sum is None else self.unique_fed_sum)
        self.unique_rows += num_rows

    def finish(self, *, generated_tokens: int, seconds: float, offload: dict | None = None) -> GenerationStats:
        """The generation's figures; `offload`: the expert store's counters over it (`ExpertStore.measure`)."""
        by_layer = None if self.unique_block_sum is None else (self.unique_block_sum / self.unique_rows).tolist()
        fed = None if self.unique_fed_sum is None else float(self.unique_fed_sum.sum() / self.unique_rows)
        return GenerationStats(
            num_forwards=self.num_forwards,
            denoising_forwards=self.denoising_forwards,
            tokens_fed=self.tokens_fed,
            generated_tokens=generated_tokens,
            active_flops=self.active_flops,
            unique_experts=None if by_layer is None else sum(by_layer) / len(by_layer),
            unique_experts_fed=None if fed is None else fed / len(by_layer),
            unique_experts_by_layer=by_layer,
            experts_per_token=self.slots / self.real_tokens if self.real_tokens else None,
            seconds=seconds,
            **(offload or {}),
        )
