"""Router modules: own W_r ∈ R^{E×D}, compute fp32 logits, call the functional routers.

The modules add only what needs state: the weight, the loss-free expert bias and its per-step
update, and the mask ratio → capacity schedule of expert choice. Each reads its config through
one frozen rule (`TopKRule`, `ExpertChoiceRule`) built once, and calls the functional routers'
unchecked internals. A `RoutingContext` carries what changes per forward (padding, decoding
blocks, block routing, an inference EC capacity) and, from the model's forward, the
`ForwardPlan` its layers share (the context checked once, the EC k and capacities computed once).

Letters: B batch, L length, D model width, E experts.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlmoe._checks import check_tensor
from dlmoe.routing.block import _block_route
from dlmoe.routing.block_expert_choice import _block_expert_choice
from dlmoe.routing.config import (
    BlockRoutingConfig,
    ExpertChoiceConfig,
    RouterConfig,
    TokenChoiceConfig,
    check_block_training,
    rule_of,
)
from dlmoe.routing.context import RoutingContext
from dlmoe.routing.dispatch import Dispatch
from dlmoe.routing.expert_choice import ExpertChoiceRule, TokenPool, _expert_choice, _expert_choice_pooled
from dlmoe.routing.plan import check_override_k
from dlmoe.routing.schedules import dynamic_k
from dlmoe.routing.token_choice import TopKRule, _scores, _token_choice
from dlmoe.vocab import ROUTER_KINDS

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
        """The context, checked against x unless the model's forward did (an empty one for None)."""
        if context is None:
            return RoutingContext()
        if not isinstance(context, RoutingContext):
            raise ValueError(f"context must be a RoutingContext or None, got {type(context).__name__}")
        plan = context.plan
        if plan is not None and (plan.batch, plan.length) == tuple(x_BLD.shape[:2]):
            return context
        return context.check(x_BLD.shape[0], x_BLD.shape[1], x_BLD.device)

    def block_of(self, context: RoutingContext) -> BlockRoutingConfig | None:
        """Block routing of this forward: the context's, else the router's own (`self.block`)."""
        return context.block if context.block is not None else self.block

    def _block(self, context: RoutingContext) -> BlockRoutingConfig | None:
        """`block_of`, checked: the guard fits the experts; training refuses what block routing cannot train."""
        block = self.block_of(context)
        if block is not None:
            if block.guard > self.config.num_experts:
                raise ValueError(
                    f"block.guard={block.guard} must be <= router.num_experts={self.config.num_experts} "
                    "(the minimum coreset size)"
                )
            if self.training:
                check_block_training(self.config, block)
        return block


class TokenChoiceRouter(Router):
    """Top-k token choice; optional loss-free expert bias and dMoE block routing.

    The expert bias steers selection only. Counts of routed tokens accumulate over the
    micro-batches of a training step; the trainer calls `update_expert_bias()` once per
    optimizer step (data-parallel code passes `reduce_counts`, e.g. an all-reduce).
    Under block routing the router trains with its z-loss only (see `TokenChoiceConfig`).
    """

    config: TokenChoiceConfig

    def __init__(self, config: TokenChoiceConfig, dim: int) -> None:
        super().__init__(config, dim)
        self.rule: TopKRule = rule_of(TopKRule, config, k=config.num_experts_per_tok)
        if config.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts))
            self.register_buffer("tokens_per_expert", torch.zeros(config.num_experts), persistent=False)
        else:
            self.expert_bias = None

    def forward(
        self, x_BLD: Tensor, mask_ratio: Tensor | None = None, context: RoutingContext | None = None
    ) -> Dispatch:
        ctx = self._context(x_BLD, context)
        if ctx.experts_per_token is not None:
            raise ValueError(
                "context.experts_per_token sets an expert-choice capacity; this router is token choice "
                f"(k = num_experts_per_tok = {self.rule.k} per token): leave it None"
            )
        logits_BLE = self.logits(x_BLD)
        bias = self.expert_bias
        num_valid = None if ctx.plan is None else ctx.plan.num_valid
        block = self._block(ctx)
        if block is not None:
            scores_BLE = _scores(logits_BLE, self.rule.score)
            z_logits = logits_BLE if self.training else None
            dispatch = _block_route(
                scores_BLE, self.rule, block, block_ids=ctx.block_ids, valid=ctx.valid, expert_bias=bias,
                num_valid=num_valid, z_logits=z_logits,
            )  # fmt: skip
        else:
            dispatch = _token_choice(
                logits_BLE, self.rule, expert_bias=bias, valid=ctx.valid, losses=self.training, num_valid=num_valid
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

    config: ExpertChoiceConfig

    def __init__(self, config: ExpertChoiceConfig, dim: int) -> None:
        super().__init__(config, dim)
        self.rule: ExpertChoiceRule = rule_of(ExpertChoiceRule, config)
        self.token_pool: TokenPool | None = None

    def experts_per_token(
        self, mask_ratio: Tensor | None, batch: int, context: RoutingContext | None = None
    ) -> int | Tensor:
        """k of this forward: the context's [B] override, else dynamic_k(mask_ratio) [B] with a
        capacity schedule, else the static k. Checked (a host read for a [B] k)."""
        c = self.config
        if context is not None and context.experts_per_token is not None:
            return check_override_k(context.experts_per_token, c.num_experts)
        if c.capacity_schedule is None:
            return c.num_experts_per_tok
        if mask_ratio is None:
            raise ValueError(
                f"this expert-choice router uses capacity_schedule={c.capacity_schedule!r}: "
                "pass mask_ratio [B] (fraction of masked tokens per sequence)"
            )
        check_tensor("mask_ratio", mask_ratio, shape=(batch,), floating=True)
        return dynamic_k(mask_ratio, c.capacity_schedule, c.k_min, c.k_max, sigma=c.schedule_sigma).to(  # type: ignore[arg-type]
            mask_ratio.device
        )

    def needs_capacity(self, context: RoutingContext) -> bool:
        """Whether this forward routes by EC pools (not block routing, not a token pool): the
        capacities a model plans once per forward."""
        return self.block_of(context) is None and not self._pooled()

    def _pooled(self) -> bool:
        return self.token_pool is not None and self.config.pool == "batch"

    def forward(
        self, x_BLD: Tensor, mask_ratio: Tensor | None = None, context: RoutingContext | None = None
    ) -> Dispatch:
        ctx = self._context(x_BLD, context)
        plan = None if ctx.plan is None else ctx.plan.for_router(self.config)
        k = plan.k if plan is not None else self.experts_per_token(mask_ratio, x_BLD.shape[0], ctx)
        logits_BLE = self.logits(x_BLD)
        valid = ctx.valid
        block = self._block(ctx)
        if block is not None:
            return _block_expert_choice(
                logits_BLE, k, self.rule, block, block_ids=ctx.block_ids, valid=valid, losses=self.training
            )
        if self._pooled():
            return _expert_choice_pooled(logits_BLE, k, self.token_pool, self.rule, valid=valid, losses=self.training)  # type: ignore[arg-type]
        capacity = None if plan is None else plan.capacity
        return _expert_choice(logits_BLE, k, self.rule, valid=valid, capacity=capacity, losses=self.training)


ROUTERS: dict[str, type[Router]] = {
    "token_choice": TokenChoiceRouter,
    "expert_choice": ExpertChoiceRouter,
}
assert tuple(ROUTERS) == ROUTER_KINDS, "dlmoe.vocab.ROUTER_KINDS must list every router module"


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
    the `with` — for evaluations that call the model without a `RoutingContext`. A router in
    training mode whose config has an aux loss or a capacity factor is refused (ValueError)."""
    routers = [m for m in model.modules() if isinstance(m, Router)]
    if block is not None:
        for router in routers:
            if router.training:
                check_block_training(router.config, block)
    saved = [r.block for r in routers]
    for router in routers:
        router.block = block
    try:
        yield
    finally:
        for router, previous in zip(routers, saved, strict=True):
            router.block = previous
