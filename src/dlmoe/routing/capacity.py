"""Expert-choice capacity: the one formula, and the capacities of a forward's pools.

An expert of a pool of n routed tokens with a budget of n·k slots takes

    C = min(max(⌊n·k / E⌋, 1), n)        (0 for an empty pool)

tokens (EC-DLM's C = max(⌊L·k/E⌋, 1), with padding left out of n, and never more tokens than the
pool holds). Every path uses it: the sequence and batch pools (per-sample k: the budget is
Σ_b n_b·k_b), the pool over several processes, and block expert choice (E = the block's coreset).

Shapes need the largest capacity on the host. `PoolCapacity` holds the capacities of one forward
with their host-side max and sum, read once (a model computes them once per forward for all its
layers; with a static k and no padding they are plain ints, with no read at all).

Letters: B batch, L length, E experts, P pools.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IntOrTensor = int | Tensor


def capacity_for_budget(budget: IntOrTensor, num_tokens: IntOrTensor, num_experts: IntOrTensor) -> IntOrTensor:
    """min(max(⌊budget / E⌋, 1), n): tokens per expert of a pool of n tokens and `budget` slots (elementwise)."""
    if not any(isinstance(v, Tensor) for v in (budget, num_tokens, num_experts)):
        return min(max(budget // num_experts, 1), num_tokens)  # type: ignore[operator]
    capacity = torch.clamp(torch.as_tensor(budget) // num_experts, min=1)
    return torch.minimum(capacity, torch.as_tensor(num_tokens, device=capacity.device))


def ec_capacity(k: IntOrTensor, num_tokens: IntOrTensor, num_experts: IntOrTensor) -> IntOrTensor:
    """C = min(max(⌊n·k / E⌋, 1), n) for k experts per token on average (ints, or tensors elementwise)."""
    return capacity_for_budget(num_tokens * k, num_tokens, num_experts)  # type: ignore[operator]


@dataclass(frozen=True)
class PoolCapacity:
    """Capacity of each pool [P] int64 with its host-side `max` and `total` (Σ over the pools)."""

    per_pool: Tensor
    max: int
    total: int

    @property
    def uniform(self) -> bool:
        """Every pool holds `max` (no slot of the padded top-k is dropped)."""
        return self.total == self.per_pool.numel() * self.max

    def kept_slots(self) -> Tensor:
        """[total] int64: the slots j < C_p of the [P, max] top-k, row-major (no host sync)."""
        pools = self.per_pool.numel()
        device = self.per_pool.device
        pool_S = torch.repeat_interleave(torch.arange(pools, device=device), self.per_pool, output_size=self.total)
        starts_P = torch.cumsum(self.per_pool, 0) - self.per_pool
        return pool_S * self.max + torch.arange(self.total, device=device) - starts_P[pool_S]


def pool_budgets(
    k: IntOrTensor, batch: int, length: int, pool: str, valid: Tensor | None, device: torch.device
) -> tuple[Tensor, Tensor] | tuple[int, int]:
    """(valid tokens n_P, budget Σ n·k per pool): P = B for "sequence", 1 for "batch"; plain ints
    (one pool's values) where k is an int and nothing is padded."""
    if not isinstance(k, Tensor) and valid is None:
        n = length if pool == "sequence" else batch * length
        return n, n * k
    k_B = k.to(device=device, dtype=torch.int64) if isinstance(k, Tensor) else torch.full((batch,), k, device=device)
    n_B = torch.full_like(k_B, length) if valid is None else valid.sum(1)
    budget_B = n_B * k_B
    if pool == "batch":  # one pool of all N tokens; per-sample k adds up to the pool's budget
        return n_B.sum(0, keepdim=True), budget_B.sum(0, keepdim=True)
    return n_B, budget_B


def pool_capacities(
    k: IntOrTensor, batch: int, length: int, num_experts: int, pool: str, valid: Tensor | None, device: torch.device
) -> tuple[IntOrTensor, PoolCapacity | None]:
    """(capacities, their `PoolCapacity`) without a host read: the `PoolCapacity` is ready where the
    capacity is a plain int (static k, no padding), else None: read it with `read_capacity`, or
    with the caller's other scalars."""
    pools = batch if pool == "sequence" else 1
    n, budget = pool_budgets(k, batch, length, pool, valid, device)
    capacity = capacity_for_budget(budget, n, num_experts)
    if isinstance(capacity, Tensor):
        return capacity, None
    per_pool = torch.full((pools,), capacity, dtype=torch.int64, device=device)
    return capacity, PoolCapacity(per_pool, capacity, pools * capacity)


def pool_capacity(
    k: IntOrTensor, batch: int, length: int, num_experts: int, pool: str, valid: Tensor | None, device: torch.device
) -> PoolCapacity:
    """Capacities of the "sequence" (P = B) or "batch" (P = 1) pools; a host read where k is per
    sample or tokens are padded."""
    capacity, ready = pool_capacities(k, batch, length, num_experts, pool, valid, device)
    return ready if ready is not None else read_capacity(capacity)  # type: ignore[arg-type]


def read_capacity(capacity_P: Tensor) -> PoolCapacity:
    """`PoolCapacity` of device capacities (one host read)."""
    high, total = torch.stack([capacity_P.max(), capacity_P.sum()]).tolist()
    return PoolCapacity(capacity_P, high, total)


__all__ = [
    "PoolCapacity",
    "capacity_for_budget",
    "ec_capacity",
    "pool_budgets",
    "pool_capacities",
    "pool_capacity",
    "read_capacity",
]
