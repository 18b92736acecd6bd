"""Expert parallelism: each rank of an EP group holds E/P experts; dispatched rows travel by all_to_all.

The router, the `Dispatch` and the combine stay on the rank that owns the tokens; only the
expert compute moves. `ShardedExperts` replaces a layer's `Experts` and keeps its parameter names
(`experts.gate_up_proj`, `experts.down_proj`), so checkpoint keys stay those of the single-process
model; the tensors hold rows [r·E/P, (r+1)·E/P) of the global stack.

Forward of one MoE layer on rank r (P ranks, E_l = E/P local experts):
  1. the dispatch's counts [E] reshaped [P, E_l] say how many rows go to each (rank, expert);
     they are exchanged first, so every rank knows what it will receive;
  2. the rows (sorted by expert, hence grouped by destination rank) are exchanged;
  3. received rows come grouped by source rank, then expert: a stable sort groups them by local
     expert, the local experts run (any backend), and the inverse permutation restores the order;
  4. the outputs go back by the reverse exchange, and the gate is applied on the owner rank.
Every step is differentiable: expert weights get the gradients of all ranks' tokens.

Letters: S slots sent, R rows received, D model width, E experts, P EP ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dlmoe.moe.experts import Experts, compute_dtype
from dlmoe.moe.layer import MoELayer
from dlmoe.parallel.all_to_all import CommStats, all_to_all, exchange_counts
from dlmoe.parallel.token_pool import GroupTokenPool
from dlmoe.routing.routers import ExpertChoiceRouter


class ShardedExperts(Experts):
    """The experts [first, first + E_local) of a layer, run for the tokens of every EP rank."""

    def __init__(self, experts: Experts, group, ep_rank: int, ep_size: int, stats: CommStats | None = None) -> None:
        if experts.num_experts % ep_size:
            raise ValueError(
                f"num_experts={experts.num_experts} is not divisible by parallel.expert_parallel={ep_size}; "
                f"allowed: a divisor of {experts.num_experts}"
            )
        num_local = experts.num_experts // ep_size
        with torch.random.fork_rng(devices=[]):  # the init below is overwritten: keep the RNG stream untouched
            super().__init__(num_local, experts.dim, experts.hidden, experts.backend)
        self.to(device=experts.gate_up_proj.device, dtype=experts.gate_up_proj.dtype)
        self.group, self.ep_rank, self.ep_size = group, ep_rank, ep_size
        self.num_global_experts = experts.num_experts
        self.first_expert = ep_rank * num_local
        self.comm_stats = stats
        rows = slice(self.first_expert, self.first_expert + num_local)
        with torch.no_grad():
            self.gate_up_proj.copy_(experts.gate_up_proj[rows])
            self.down_proj.copy_(experts.down_proj[rows])

    def forward(
        self, x_SD: Tensor, counts: Tensor, gate_S: Tensor | None = None, *, equal_counts: bool = False
    ) -> Tensor:
        """Same contract as `Experts.forward` with global `counts` [E]: rows of every expert, local or not."""
        if counts.shape != (self.num_global_experts,):
            raise ValueError(f"counts must have shape ({self.num_global_experts},), got {tuple(counts.shape)}")
        num_local, ranks = self.num_experts, self.ep_size
        x = x_SD.to(compute_dtype(x_SD))  # ship rows in the compute dtype (half the bytes under bf16)

        # 1. counts first: [P, E_l] rows I send per (rank, expert) → rows I receive per (source, expert)
        send_PE = counts.view(ranks, num_local)
        recv_PE = exchange_counts(send_PE, self.group)
        send_splits = send_PE.sum(1).tolist()
        recv_counts = recv_PE.tolist()
        recv_splits = [sum(row) for row in recv_counts]

        # 2. rows out, grouped by destination rank (slots are sorted by expert)
        rows_RD = all_to_all(x, recv_splits, send_splits, self.group, self.comm_stats)

        # 3. group the received rows by local expert, run the experts, undo the permutation
        local_counts = recv_PE.sum(0)
        expert_R = torch.arange(num_local, device=x.device).repeat(ranks)
        expert_R = expert_R.repeat_interleave(recv_PE.reshape(-1))
        order_R = torch.sort(expert_R, stable=True).indices
        inverse_R = torch.empty_like(order_R)
        inverse_R[order_R] = torch.arange(order_R.numel(), device=x.device)
        totals = [sum(col) for col in zip(*recv_counts, strict=True)]
        y_sorted = super().forward(
            rows_RD.index_select(0, order_R), local_counts, None, equal_counts=len(set(totals)) == 1
        )
        y_RD = y_sorted.index_select(0, inverse_R)

        # 4. outputs back to the ranks that own the tokens; the gate is applied there
        y_SD = all_to_all(y_RD, send_splits, recv_splits, self.group, self.comm_stats)
        if gate_S is not None:
            y_SD = y_SD * gate_S.to(y_SD.dtype).unsqueeze(-1)
        return y_SD

    def extra_repr(self) -> str:
        return (
            f"experts [{self.first_expert}, {self.first_expert + self.num_experts}) of {self.num_global_experts} "
            f"on EP rank {self.ep_rank}/{self.ep_size}, dim={self.dim}, hidden={self.hidden}, backend={self.backend}"
        )


def apply_expert_parallel(
    model: nn.Module, group, ep_rank: int, ep_size: int, *, ec_pool: str = "local", stats: CommStats | None = None
) -> list[ShardedExperts]:
    """Shard the experts of every MoE layer of `model` over the EP group (in place).

    `ec_pool="group"`: expert-choice routers with `pool="batch"` rank the tokens of the whole
    group. Call before data parallelism wraps the model; returns the sharded modules."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError("expert parallelism needs an MoE model: this model has no MoE layer")
    sharded = []
    for layer in layers:
        layer.experts = ShardedExperts(layer.experts, group, ep_rank, ep_size, stats)
        sharded.append(layer.experts)
        if ec_pool == "group" and isinstance(layer.router, ExpertChoiceRouter):
            layer.router.token_pool = GroupTokenPool(group, ep_rank, ep_size)
    return sharded


def expert_parameter_names(model: nn.Module) -> set[str]:
    """Fully qualified names of the expert-parallel (EP-sharded) parameters of `model`."""
    return {
        f"{module_name}.{param_name}"
        for module_name, module in model.named_modules()
        if isinstance(module, ShardedExperts)
        for param_name, _ in module.named_parameters(recurse=False)
    }


def gather_experts(local: Tensor, group, ep_size: int) -> Tensor:
    """The full [E, ...] stack from every rank's [E/P, ...] rows (for export)."""
    parts = [torch.empty_like(local) for _ in range(ep_size)]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    return torch.cat(parts)
