"""Routers for MoE diffusion LMs; all of them return a `Dispatch`.

Functional API (pure functions on router logits / scores, no parameters):
    token_choice(logits, k, *, score, renormalize, capacity_factor, expert_bias, ..., valid)
    expert_choice(logits, k, *, pool, select, gate, z_loss_coef, valid)   # k: int or [B] int tensor
    block_route(scores, k, *, block_size, block_ids, valid, top_p, guard, ...)   # dMoE block routing
    block_expert_choice(logits, k, *, block_size, block_ids, valid, top_p, guard, select, gate)
    schedules.dynamic_k(r, schedule, k_min, k_max), schedules.expected_k(schedule, k_min, k_max)
    capacity.ec_capacity(k, num_tokens, num_experts)   # the one EC capacity formula
Configs (one per kind): RouterConfig (kind → TokenChoiceConfig | ExpertChoiceConfig), BlockRoutingConfig.
Modules (own W_r, fp32 logits): TokenChoiceRouter, ExpertChoiceRouter, build_router; their
forward(x, mask_ratio, context) takes a per-forward RoutingContext (padding, blocks, EC capacity),
which a model's forward checks once and completes with a ForwardPlan (plan_forward).
"""

from dlmoe.routing import schedules
from dlmoe.routing.block import block_route
from dlmoe.routing.block_expert_choice import block_expert_choice
from dlmoe.routing.capacity import ec_capacity
from dlmoe.routing.config import BlockRoutingConfig, ExpertChoiceConfig, RouterConfig, TokenChoiceConfig
from dlmoe.routing.context import RoutingContext
from dlmoe.routing.dispatch import Dispatch, RoutingStats, unique_experts_per_block
from dlmoe.routing.expert_choice import expert_choice
from dlmoe.routing.plan import ForwardPlan, plan_forward
from dlmoe.routing.routers import (
    ROUTERS,
    ExpertChoiceRouter,
    Router,
    TokenChoiceRouter,
    build_router,
    update_expert_biases,
)
from dlmoe.routing.token_choice import switch_aux_loss, token_choice, z_loss

__all__ = [
    "ROUTERS",
    "BlockRoutingConfig",
    "Dispatch",
    "ExpertChoiceConfig",
    "ExpertChoiceRouter",
    "ForwardPlan",
    "Router",
    "RouterConfig",
    "RoutingContext",
    "RoutingStats",
    "TokenChoiceConfig",
    "TokenChoiceRouter",
    "block_expert_choice",
    "block_route",
    "build_router",
    "ec_capacity",
    "expert_choice",
    "plan_forward",
    "schedules",
    "switch_aux_loss",
    "token_choice",
    "unique_experts_per_block",
    "update_expert_biases",
    "z_loss",
]
