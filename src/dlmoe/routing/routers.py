"""Router modules: own W_r ∈ R^{E×D}, compute fp32 logits, call the functional routers.

The modules add only what needs state: the weight, the loss-free expert bias and its per-step
update, and the mask ratio → capacity schedule of expert choice. A `RoutingContext` carries what
changes per forward (padding, decoding blocks, block routing, an inference EC capacity).

Letters: B batch, L length, D model width, E experts.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlmoe._checks import check_tensor
from dlmoe.routing.block import block_route
from dlmoe.routing.block_expert_choice import block_expert_choice
from dlmoe.routing.context import RoutingContext
from dlmoe.routing.dispatch import Dispatch
from dlmoe.routing.expert_choice import TokenPool, expert_choice, expert_choice_pooled
from dlmoe.routing.schedules import dynamic_k
from dlmoe.routing.token_choice import router_scores, token_choice

if TYPE_CHECKING:
    from dlmoe.config import BlockRoutingConfig, RouterConfig

CountsReducer = Callable[[Tensor], Tensor]


class Router(nn.Module):
    """Base: the router weight and fp32 logits (autocast off: routing decisions are precision-sensitive)."""

    def __init__(self, config: RouterConfig, dim: int) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.num_experts, dim))
        nn.init.normal_(self.weight, std=0.02)
        # block routing; an attribute, so a built router may be switched to block routing at inference
        self.block: BlockRoutingConfig | None = config.block

    def logits(self, x_BLD: Tensor) -> Tensor:
        """[B, L, E] float32 router logits."""
        with torch.autocast(x_BLD.device.type, enabled=False):
            return F.linear(x_BLD.float(), self.weight.float())

    @abstractmethod
    def forward(
        self, x_BLD: Tensor, mask_ratio: Tensor | None = None, context: RoutingContext | None = None
    ) -> Dispatch:
        """Route x [B, L, D] (with the per-sample mask ratio [B] where the router uses it).

        `context` (padding, blocks, block routing, EC capacity) overrides the config for this
        forward only; None routes exactly as the config says.
        """

    def _context(self, x_BLD: Tensor, context: RoutingContext | None) -> RoutingContext:
        """The context checked against x (an empty one for None)."""
        if context is None:
            return RoutingContext()
        if not isinstance(context, RoutingContext):
            raise ValueError(f"context must be a RoutingContext or None, got {type(context).__name__}")
        return context.check(x_BLD.shape[0], x_BLD.shape[1], x_BLD.device)

    def _block(self, context: RoutingContext) -> BlockRoutingConfig | None:
        """Block routing of this forward: the context's, else the router's own (`self.block`)."""
        return context.block if context.block is not None else self.block


class TokenChoiceRouter(Router):
    """Top-k token choice; optional loss-free expert bias and dMoE block routing.

    The expert bias steers selection only. Counts of routed tokens accumulate over the
    micro-batches of a training step; the trainer calls `update_expert_bias()` once per
    optimizer step (data-parallel code passes `reduce_counts`, e.g. an all-reduce).
    """

    def __init__(self, config: RouterConfig, dim: int) -> None:
        super().__init__(config, dim)
        if config.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts))
            self.register_buffer("tokens_per_expert", torch.zeros(config.num_experts), persistent=False)
        else:
            self.expert_bias = None

    def forward(
        self, x_BLD: Tensor, mask_ratio: Tensor | None = None, context: RoutingContext | None = None
    ) -> Dispatch:
        c = self.config
        ctx = self._context(x_BLD, context)
        if ctx.experts_per_token is not None:
            raise ValueError(
                "context.experts_per_token sets an expert-choice capacity; this router is token choice "
                f"(k = num_experts_per_tok = {c.num_experts_per_tok} per token): leave it None"
            )
        logits_BLE = self.logits(x_BLD)
        bias = self.expert_bias
        block = self._block(ctx)
        if block is not None:
            dispatch = block_route(
                router_scores(logits_BLE, c.score),
                c.num_experts_per_tok,
                block_size=block.block_size,
                block_ids=ctx.block_ids,
                valid=ctx.valid,
                top_p=block.top_p,
                guard=block.guard,
                expert_bias=bias,
                n_group=c.n_group,
                topk_group=c.topk_group,
                renormalize=c.renormalize,
                routed_scaling_factor=c.routed_scaling_factor,
                bias_in_gate=c.bias_in_gate,
            )
        else:
            dispatch = token_choice(
                logits_BLE,
                c.num_experts_per_tok,
                score=c.score,
                renormalize=c.renormalize,
                capacity_factor=c.capacity_factor,
                expert_bias=bias,
                n_group=c.n_group,
                topk_group=c.topk_group,
                routed_scaling_factor=c.routed_scaling_factor,
                aux_loss_coef=c.aux_loss_coef if self.training else 0.0,
                z_loss_coef=c.z_loss_coef if self.training else 0.0,
                valid=ctx.valid,
                bias_in_gate=c.bias_in_gate,
            )
        if bias is not None and self.training:
            # counts of the valid tokens before any capacity drop, as in loss-free balancing
            self.tokens_per_expert += dispatch.requested_counts.float()
        return dispatch

    @torch.no_grad()
    def update_expert_bias(self, reduce_counts: CountsReducer | None = None) -> None:
        """b_e += u · sign(mean(n) − n_e), then reset the counts. No-op without expert bias."""
        if self.expert_bias is None:
            return
        counts = self.tokens_per_expert
        if reduce_counts is not None:
            counts = reduce_counts(counts.clone())
        self.expert_bias += self.config.bias_update_rate * torch.sign(counts.mean() - counts)
        self.tokens_per_expert.zero_()


class ExpertChoiceRouter(Router):
    """Expert choice with a static k, or a per-sample k from the mask ratio (capacity schedule).

    With block routing (the context's or the router's `block`), EC runs inside each block's voted
    coreset (`block_expert_choice`; the blocks replace `pool`). `context.experts_per_token`
    overrides k for one forward. `token_pool` (set by expert parallelism, `parallel.ec_pool="group"`)
    makes `pool="batch"` rank the tokens of several processes.
    """

    def __init__(self, config: RouterConfig, dim: int) -> None:
        super().__init__(config, dim)
        self.token_pool: TokenPool | None = None

    def experts_per_token(
        self, mask_ratio: Tensor | None, batch: int, context: RoutingContext | None = None
    ) -> int | Tensor:
        """k of this forward: the context's [B] override, else dynamic_k(mask_ratio) [B] with a
        capacity schedule, else the static k."""
        c = self.config
        if context is not None and context.experts_per_token is not None:
            k_B = context.experts_per_token
            if bool(((k_B < 1) | (k_B > c.num_experts)).any()):
                raise ValueError(
                    f"context.experts_per_token must lie in [1, {c.num_experts}] (num_experts) for every row, "
                    f"got {k_B.tolist()}"
                )
            return k_B.long()
        if c.capacity_schedule is None:
            return c.num_experts_per_tok
        if mask_ratio is None:
            raise ValueError(
                f"this expert-choice router uses capacity_schedule={c.capacity_schedule!r}: "
                "pass mask_ratio [B] (fraction of masked tokens per sequence)"
            )
        check_tensor("mask_ratio", mask_ratio, shape=(batch,), floating=True)
        return dynamic_k(mask_ratio, c.capacity_schedule, c.k_min, c.k_max, sigma=c.schedule_sigma).to(
            mask_ratio.device
        )

    def forward(
        self, x_BLD: Tensor, mask_ratio: Tensor | None = None, context: RoutingContext | None = None
    ) -> Dispatch:
        c = self.config
        ctx = self._context(x_BLD, context)
        k = self.experts_per_token(mask_ratio, x_BLD.shape[0], ctx)
        z_loss_coef = c.z_loss_coef if self.training else 0.0
        block = self._block(ctx)
        if block is not None:
            return block_expert_choice(
                self.logits(x_BLD),
                k,
                block_size=block.block_size,
                block_ids=ctx.block_ids,
                valid=ctx.valid,
                top_p=block.top_p,
                guard=block.guard,
                select=c.select,
                gate=c.gate,
                z_loss_coef=z_loss_coef,
            )
        if self.token_pool is not None and c.pool == "batch":
            return expert_choice_pooled(
                self.logits(x_BLD),
                k,
                self.token_pool,
                select=c.select,
                gate=c.gate,
                z_loss_coef=z_loss_coef,
                valid=ctx.valid,
            )
        return expert_choice(
            self.logits(x_BLD),
            k,
            pool=c.pool,
            select=c.select,
            gate=c.gate,
            z_loss_coef=z_loss_coef,
            valid=ctx.valid,
        )


ROUTERS: dict[str, type[Router]] = {
    "token_choice": TokenChoiceRouter,
    "expert_choice": ExpertChoiceRouter,
}


def build_router(config: RouterConfig, dim: int) -> Router:
    """Instantiate the router registered under `config.kind`."""
    return ROUTERS[config.kind](config, dim)


def update_expert_biases(model: nn.Module, reduce_counts: CountsReducer | None = None) -> None:
    """Apply the loss-free bias update to every token-choice router of `model` (once per step)."""
    for module in model.modules():
        if isinstance(module, TokenChoiceRouter):
            module.update_expert_bias(reduce_counts)


@contextmanager
def block_routing(model: nn.Module, block: BlockRoutingConfig | None) -> Iterator[None]:
    """Route every router of `model` with dMoE block routing `block` (None: token routing) inside
    the `with` — for evaluations that call the model without a `RoutingContext`."""
    routers = [m for m in model.modules() if isinstance(m, Router)]
    saved = [r.block for r in routers]
    for router in routers:
        router.block = block
    try:
        yield
    finally:
        for router, previous in zip(routers, saved, strict=True):
            router.block = previous
