"""The MoE feed-forward block: router → dispatch → experts → combine (+ shared experts).

Letters: B batch, L length, N = B·L tokens, D model width, S slots.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from dlmoe._checks import check_int, check_tensor
from dlmoe.config import MoEConfig
from dlmoe.moe.experts import Experts, SwiGLU
from dlmoe.routing.context import RoutingContext
from dlmoe.routing.dispatch import Dispatch
from dlmoe.routing.routers import build_router


@dataclass(frozen=True)
class MoEOutput:
    """What an MoE layer returns besides its output: router losses and the routing decision."""

    aux_loss: Tensor
    dispatch: Dispatch


class MoELayer(nn.Module):
    """Mixture-of-experts SwiGLU feed-forward block.

    Forward, in order:
      1. route: the router turns x [B, L, D] (and the per-sample mask ratio, and the per-forward
         `RoutingContext`: padding, blocks, block routing, EC capacity) into a `Dispatch`;
      2. dispatch: gather the rows of x each slot carries, sorted by expert → [S, D];
      3. experts: `self.experts(rows, counts, gates)` → gate · Expert(row) — the one place expert
         parallelism wraps;
      4. combine: out[t] = Σ_slots of t, by index_add (unchosen tokens get zeros);
      5. shared experts (if any) are added densely.
    """

    def __init__(self, config: MoEConfig, dim: int) -> None:
        super().__init__()
        self.config = config
        self.dim = check_int("dim", dim, low=1)
        self.router = build_router(config.router, dim)
        self.experts = Experts(config.router.num_experts, dim, config.expert_hidden, config.backend)
        self.shared_experts = SwiGLU(dim, config.shared_width) if config.shared_width else None

    def forward(
        self, x_BLD: Tensor, mask_ratio: Tensor | None = None, context: RoutingContext | None = None
    ) -> tuple[Tensor, MoEOutput]:
        """x [B, L, D] → (out [B, L, D], MoEOutput). `mask_ratio` [B] feeds capacity schedules.

        Padding (`context.valid` False) gets no routed output: only the shared experts, if any.
        """
        check_tensor("x", x_BLD, ndim=3, floating=True)
        if x_BLD.shape[-1] != self.dim:
            raise ValueError(f"x must have last dimension {self.dim}, got shape {tuple(x_BLD.shape)}")
        batch, length, dim = x_BLD.shape
        x_ND = x_BLD.reshape(-1, dim)

        dispatch = self.router(x_BLD, mask_ratio, context)
        rows_SD = dispatch.gather(x_ND)
        y_SD = self.experts(rows_SD, dispatch.counts, dispatch.gate, equal_counts=dispatch.equal_counts)
        out_ND = dispatch.combine(y_SD, apply_gate=False)
        if self.shared_experts is not None:
            out_ND = out_ND + self.shared_experts(x_ND)
        out_BLD = out_ND.view(batch, length, dim)
        return out_BLD, MoEOutput(aux_loss=dispatch.aux_loss, dispatch=dispatch)
