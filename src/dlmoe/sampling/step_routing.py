"""Which routed experts one denoising step used for its current decoding block (`StepInfo.routing`).

A viewer (e.g. a server's page) shows, after each step, the experts each MoE layer used for the
block being decoded — and, under dMoE block routing, the block's coreset next to the experts plain
token routing would have used (its votes). The sampler only keeps references to the forward's
dispatches; every figure is computed when asked for, so a callback that never looks (a progress
bar) pays nothing.

Letters: B conditional rows, R = B or 2B model rows (CFG), F fed columns, E experts, P blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from dlmoe.routing.dispatch import Dispatch


@dataclass(frozen=True)
class StepRouting:
    """The routing of the forward whose logits chose a step's commits.

    dispatches:    one per MoE layer, over the fed [R, F] tokens (`token_index` = r·F + f).
    block_columns: [R, F] bool, the fed columns of the current block's real tokens.
    block_offset:  fed column where the current decoding block starts (KV caches feed a slice of
                   the canvas).
    num_rows:      B, the conditional rows (CFG runs 2B rows; the unconditional ones are left out).
    block:         the decoding block's index.
    """

    dispatches: tuple[Dispatch, ...]
    block_columns: Tensor
    block_offset: int
    num_rows: int
    block: int

    @property
    def num_layers(self) -> int:
        return len(self.dispatches)

    @property
    def num_experts(self) -> int:
        return self.dispatches[0].num_experts

    def expert_load(self) -> Tensor:
        """[B, layers, E] int64: routed slots per expert among each row's current-block tokens (shared
        experts excluded); summed over experts, the routed slots of those tokens."""
        return torch.stack([d.expert_load(self.block_columns)[: self.num_rows] for d in self.dispatches], dim=1)

    def coreset(self) -> Tensor | None:
        """[B, layers, E] bool: the experts block routing allowed the current block; None without it."""
        return self._of_block([d.coreset_mask for d in self.dispatches])

    def votes(self) -> Tensor | None:
        """[B, layers, E] float32: the current block's normalised votes (> 0: the experts plain token
        routing would have used there); None without block routing."""
        votes = self._of_block([d.block_votes for d in self.dispatches])
        return None if votes is None else votes.float()

    def _of_block(self, per_block: list[Tensor | None]) -> Tensor | None:
        """Each layer's [R, P, E] figure at the routing block holding the current decoding block's columns."""
        if any(x is None for x in per_block):
            return None
        rows = []
        for d, x_RPE in zip(self.dispatches, per_block, strict=True):
            block_1 = d.block_index[self.block_offset : self.block_offset + 1]  # index_select: no host read
            rows.append(x_RPE[: self.num_rows].index_select(1, block_1).squeeze(1))
        return torch.stack(rows, dim=1)


__all__ = ["StepRouting"]
