"""`GroupTokenPool`: the `TokenPool` of `routing.expert_choice` over a process group.

Expert choice with `pool="batch"` ranks the tokens of a batch; over an EP group each rank holds
only its slice. Pooling the ranks' router scores (an all_gather of [N, E] floats per layer, no
gradient: selection is not differentiable) makes every expert choose among the tokens of the
whole group, as one process holding the group's batch would.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class GroupTokenPool:
    """Members = the ranks of `group`, in group-rank order."""

    def __init__(self, group, rank: int, size: int) -> None:
        self.group, self.rank, self.size = group, rank, size

    @torch.no_grad()
    def gather(self, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts)
