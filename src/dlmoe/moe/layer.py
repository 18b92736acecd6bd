"""The MoE feed-forward block: router → dispatch → experts → combine (+ shared experts).

Letters: B batch, L length, N = B·L tokens, D model width, S slots.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dlmoe._checks import check_int, check_tensor
from dlmoe.config import MoEConfig
from dlmoe.moe.experts import Experts, SwiGLU
from dlmoe.routing.context import RoutingContext
from dlmoe.routing.dispatch import Dispatch
from dlmoe.routing.routers import build_router
from dlmoe.routing.scaling import ec_scaling_table, tc_scaling_factor


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
         with `router.scaling_factor` (EC-DLM's `--enable-scaling-factor`) its gates are then
         multiplied by f (`dlmoe.routing.scaling`): token choice by one constant, expert choice
         by f(number of slots the token received in this dispatch) — here, once, so block
         routing, expert parallelism and an inference EC capacity are all covered;
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
        self.routed_off = False  # the routed-experts-off control (`routed_experts_off`): routed output dropped
        # EC-DLM's scaling factor: not a buffer (a pure function of the config, and transformers'
        # meta-device loading leaves non-persistent buffers uninitialised); the EC table is copied
        # once per device, so a forward reads it without a host sync
        router = config.router
        self._tc_scale: float | None = None
        self._ec_table_cpu: Tensor | None = None
        self._ec_tables: dict[torch.device, Tensor] = {}
        if router.scaling_factor and router.kind == "token_choice":
            k, shared = router.num_experts_per_tok, config.num_shared_experts
            self._tc_scale = tc_scaling_factor(router.num_experts, k, shared, router.score, router.renormalize)
        elif router.scaling_factor:
            self._ec_table_cpu = ec_scaling_table(router.num_experts, config.num_shared_experts)

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

        dispatch = self._scaled(self.router(x_BLD, mask_ratio, context))
        rows_SD = dispatch.gather(x_ND)
        y_SD = self.experts(rows_SD, dispatch.counts, dispatch.gate, equal_counts=dispatch.equal_counts)
        out_ND = dispatch.combine(y_SD, apply_gate=False)
        if self.routed_off:
            out_ND = torch.zeros_like(out_ND)
        if self.shared_experts is not None:
            out_ND = out_ND + self.shared_experts(x_ND)
        out_BLD = out_ND.view(batch, length, dim)
        return out_BLD, MoEOutput(aux_loss=dispatch.aux_loss, dispatch=dispatch)

    def _scaled(self, dispatch: Dispatch) -> Dispatch:
        """The dispatch with EC-DLM's scaling factor in its gates (unchanged without the option).

        Token choice: gate · f(k), the same constant for every slot, a slot dropped by capacity
        included (as EC-DLM). Expert choice: gate_s · f(n_t), n_t = the slots token t = token_index[s]
        holds in this dispatch. f is a constant: gradients reach the logits through the gate only.
        """
        if self._tc_scale is not None:
            return dataclasses.replace(dispatch, gate=dispatch.gate * self._tc_scale)
        if self._ec_table_cpu is None:
            return dispatch
        token_S = dispatch.token_index
        factor_S = self._ec_table(token_S.device)[dispatch.experts_per_token()[token_S]]
        return dataclasses.replace(dispatch, gate=dispatch.gate * factor_S.to(dispatch.gate.dtype))

    def _ec_table(self, device: torch.device) -> Tensor:
        """[E + 1] float32 f(0..E) on `device` (copied there on first use)."""
        if device not in self._ec_tables:
            self._ec_tables[device] = self._ec_table_cpu.to(device)
        return self._ec_tables[device]


@contextmanager
def routed_experts_off(model: nn.Module) -> Iterator[None]:
    """Inside the `with`, every MoE layer of `model` drops its routed experts' output (the shared
    experts and everything else stay): the control that measures how much the routed experts
    contribute — the validation ELBO with them off minus the ELBO with them on."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError("routed_experts_off needs a model with MoE layers; this one has none")
    for layer in layers:
        layer.routed_off = True
    try:
        yield
    finally:
        for layer in layers:
            layer.routed_off = False
