"""A differentiable, timed `all_to_all_single` with uneven splits.

Forward sends `input_splits[j]` rows to rank j and receives `output_splits[j]` rows from it;
backward is the same exchange with the splits swapped (the gradient of a row goes back to the
rank that sent it). Written here rather than using `torch.distributed.nn.functional` (deprecated)
or the private functional collectives, so the autograd contract is ours and tested.

`CommStats` adds up wall time and bytes of every exchange in forward and backward: the benchmark
reports the time spent in all_to_all. On CUDA the time includes a device sync, so enable it only
when measuring.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class CommStats:
    """Seconds, calls and bytes of the all_to_all exchanges (forward and backward)."""

    enabled: bool = False
    seconds: float = 0.0
    calls: int = 0
    bytes: int = 0

    def reset(self) -> None:
        self.seconds, self.calls, self.bytes = 0.0, 0, 0


def _exchange(x: Tensor, output_splits: list[int], input_splits: list[int], group, stats: CommStats | None) -> Tensor:
    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    timed = stats is not None and stats.enabled
    if timed:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    if timed:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        stats.seconds += time.perf_counter() - start
        stats.calls += 1
        stats.bytes += (x.numel() + out.numel()) * x.element_size()
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, output_splits: list[int], input_splits: list[int], group, stats):
        ctx.splits, ctx.group, ctx.stats = (output_splits, input_splits), group, stats
        return _exchange(x, output_splits, input_splits, group, stats)

    @staticmethod
    def backward(ctx, grad: Tensor):
        output_splits, input_splits = ctx.splits
        return _exchange(grad, input_splits, output_splits, ctx.group, ctx.stats), None, None, None, None


def all_to_all(
    x: Tensor, output_splits: list[int], input_splits: list[int], group=None, stats: CommStats | None = None
) -> Tensor:
    """Rows of `x` [sum(input_splits), ...] → [sum(output_splits), ...]; autograd-aware."""
    if x.shape[0] != sum(input_splits):
        raise ValueError(f"x has {x.shape[0]} rows but input_splits {input_splits} add up to {sum(input_splits)}")
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group, stats)


def exchange_counts(send_counts: Tensor, group=None) -> Tensor:
    """[P, E_local] rows-per-(destination rank, expert) → [P, E_local] rows-per-(source rank, expert).

    The counts go first so that every rank knows how many rows it will receive (the token
    exchange needs the split sizes on the host)."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv.view(-1), send_counts.contiguous().view(-1), group=group)
    return recv
