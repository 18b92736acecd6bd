"""The routing facts of one model forward, computed once for all of its MoE layers.

A model routes the same batch in every MoE layer. What depends only on the batch — the count of
valid (unpadded) tokens, the expert-choice k of each row (a capacity schedule of the mask ratio,
or an inference override) and the pool capacities it gives — is computed once by the model's
forward, with at most one host read (none for a static k without padding), and each layer reads
it from the `RoutingContext`. A router called on its own (no plan) computes and checks them itself.

Letters: B batch, L length, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dlmoe._checks import check_tensor
from dlmoe.routing.capacity import PoolCapacity, pool_capacities
from dlmoe.routing.config import ExpertChoiceConfig, RouterConfig
from dlmoe.routing.context import RoutingContext, check_experts_per_token
from dlmoe.routing.schedules import _round_k, check_mask_ratio


@dataclass(frozen=True)
class ExpertChoicePlan:
    """k of this forward (an int or [B] int64) and the capacities it gives, for the router configs
    whose `capacity_key()` is `key`; `capacity` None where no layer needs it (block routing, a token pool)."""

    key: tuple[Any, ...]
    k: int | Tensor
    capacity: PoolCapacity | None


@dataclass(frozen=True)
class ForwardPlan:
    """What every MoE layer of one forward over a [B, L] input shares."""

    batch: int
    length: int
    num_valid: int | None  # valid tokens of the batch (host-side); None when nothing is padded
    expert_choice: ExpertChoicePlan | None = None

    def for_router(self, config: RouterConfig) -> ExpertChoicePlan | None:
        """The expert-choice plan if it was made for this router's config, else None."""
        plan = self.expert_choice
        if plan is None or not isinstance(config, ExpertChoiceConfig) or plan.key != config.capacity_key():
            return None
        return plan


def check_override_k(k_B: Tensor, num_experts: int) -> Tensor:
    """`context.experts_per_token` must lie in [1, E] (a host read); returns it as int64."""
    if bool(((k_B < 1) | (k_B > num_experts)).any()):
        raise ValueError(
            f"context.experts_per_token must lie in [1, {num_experts}] (num_experts) for every row, got {k_B.tolist()}"
        )
    return k_B.long()


def expert_choice_k(
    config: ExpertChoiceConfig, mask_ratio: Tensor | None, batch: int, context: RoutingContext
) -> tuple[int | Tensor, Tensor | None]:
    """(k of this forward, a device flag that is True when the input was out of range: None if
    nothing needs checking): the context's override, else the schedule's k of the mask ratio, else
    the static k. Shapes are checked here; ranges by the caller, who reads the flag."""
    if context.experts_per_token is not None:
        k_B = context.experts_per_token
        return k_B.long(), ((k_B < 1) | (k_B > config.num_experts)).any()
    if config.capacity_schedule is None:
        return config.num_experts_per_tok, None
    if mask_ratio is None:
        raise ValueError(
            f"this expert-choice router uses capacity_schedule={config.capacity_schedule!r}: "
            "pass mask_ratio [B] (fraction of masked tokens per sequence)"
        )
    check_tensor("mask_ratio", mask_ratio, shape=(batch,), floating=True)
    schedule = (config.capacity_schedule, config.k_min, config.k_max, config.schedule_sigma)
    k_B = _round_k(mask_ratio, *schedule).to(torch.int64).to(mask_ratio.device)  # type: ignore[arg-type]
    return k_B, ((mask_ratio < 0) | (mask_ratio > 1) | torch.isnan(mask_ratio)).any()


def plan_forward(
    context: RoutingContext,
    *,
    valid: Tensor | None,
    block_ids: Tensor | None,
    batch: int,
    length: int,
    device: torch.device,
    mask_ratio: Tensor | None,
    router: RouterConfig | None,
    need_capacity: bool,
) -> RoutingContext:
    """The context of one model forward over a [B, L] input on `device`, with its `ForwardPlan`.

    `context`: the caller's (block routing, EC k override; checked when it was built), its padding
    and blocks replaced by `valid` [B, L] and `block_ids` [L] (the model checked them). `router`:
    the model's router config (its expert-choice k is planned); `need_capacity`: some
    expert-choice layer routes without block routing or a token pool (plan its capacities).
    """
    check_experts_per_token(context.experts_per_token, batch, device)
    scalars: list[Tensor] = []  # read from the device together, once
    ec_k: int | Tensor | None = None
    bad_k = capacity_P = capacity = None
    if isinstance(router, ExpertChoiceConfig):
        ec_k, bad_k = expert_choice_k(router, mask_ratio, batch, context)
        scalars += [] if bad_k is None else [bad_k]
        if need_capacity:
            capacity_P, capacity = pool_capacities(ec_k, batch, length, router.num_experts, router.pool, valid, device)
            scalars += [] if capacity is not None else [capacity_P.max(), capacity_P.sum()]  # type: ignore[union-attr]
    if valid is not None:
        scalars.append(valid.sum())
    values = torch.stack([s.to(device=device, dtype=torch.int64) for s in scalars]).tolist() if scalars else []
    if bad_k is not None and values.pop(0):
        _raise_bad_k(router, mask_ratio, context)  # type: ignore[arg-type]
    if capacity_P is not None and capacity is None:
        capacity = PoolCapacity(capacity_P, values.pop(0), values.pop(0))  # type: ignore[arg-type]
    num_valid = values.pop(0) if valid is not None else None
    ec_plan = None if ec_k is None else ExpertChoicePlan(router.capacity_key(), ec_k, capacity)  # type: ignore[union-attr]
    return RoutingContext(
        valid=valid,
        block_ids=block_ids,
        block=context.block,
        experts_per_token=context.experts_per_token,
        plan=ForwardPlan(batch, length, num_valid, ec_plan),
    )


def _raise_bad_k(config: ExpertChoiceConfig, mask_ratio: Tensor | None, context: RoutingContext) -> None:
    if context.experts_per_token is not None:
        check_override_k(context.experts_per_token, config.num_experts)
    check_mask_ratio(mask_ratio)  # type: ignore[arg-type]
    raise AssertionError("the range flag and the range checks disagree")  # pragma: no cover


__all__ = ["ExpertChoicePlan", "ForwardPlan", "check_override_k", "expert_choice_k", "plan_forward"]
