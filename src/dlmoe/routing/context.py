"""RoutingContext: per-forward facts that the caller (sampler, model) knows and the router config does not.

At inference a sampler runs left-padded batches, decodes in blocks, and may want a different
expert-choice capacity than training used. None of that belongs to the router's config: it
changes from one forward to the next. A context is built once per forward, shared by every MoE
layer; its intrinsic checks run once, here. The model's forward checks it against the input once
and attaches a `ForwardPlan` (`dlmoe.routing.plan`: what every layer would otherwise recompute);
a router given a context without a plan (called on its own) checks it against its input itself.

Letters: B batch, L length, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from dlmoe._checks import check_tensor

if TYPE_CHECKING:
    from dlmoe.routing.config import BlockRoutingConfig
    from dlmoe.routing.plan import ForwardPlan


@dataclass(frozen=True)
class RoutingContext:
    """Per-forward facts set by the caller (sampler/model), not by the router's config.

    Attributes:
        valid: [B, L] bool; False marks padding: the token gets no slot, casts no block vote and
            counts toward no capacity, expert-bias count or router loss.
        block_ids: [L] int64, non-decreasing (may be negative): the routing blocks shared by all
            rows (the sampler's decoding blocks), one block per run of equal ids. Used only when
            block routing is on; default there: arange(L) // block.block_size.
        block: dMoE block routing for this forward; overrides the router's own `block` when set.
        experts_per_token: [B] int64 in [1, E]: expert-choice k per row for this forward (an
            inference capacity policy); overrides the static k and the mask-ratio schedule.
            A token-choice router refuses it.
        plan: set by the model's forward (`dlmoe.routing.plan.plan_forward`) once it has checked
            the context against its input; leave it None.
    """

    valid: Tensor | None = None
    block_ids: Tensor | None = None
    block: BlockRoutingConfig | None = None
    experts_per_token: Tensor | None = None
    plan: ForwardPlan | None = None

    def __post_init__(self) -> None:
        if self.plan is not None:  # built by plan_forward from a context already checked
            return
        if self.valid is not None:
            check_valid(self.valid, None, None, name="context.valid")
        if self.block_ids is not None:
            check_block_ids(self.block_ids, None, name="context.block_ids")
        if self.block is not None and not all(hasattr(self.block, a) for a in ("block_size", "top_p", "guard")):
            kind = type(self.block).__name__
            raise ValueError(f"context.block must be a BlockRoutingConfig (block_size, top_p, guard), got {kind}")
        if self.experts_per_token is not None:
            k = check_tensor("context.experts_per_token", self.experts_per_token, ndim=1, floating=False)
            if k.dtype == torch.bool:
                raise ValueError("context.experts_per_token must be an int64 tensor, got dtype torch.bool")

    def check(self, batch: int, length: int, device: torch.device) -> RoutingContext:
        """Shapes and devices against the routed input [B, L, ·]; returns self."""
        if self.valid is not None:
            check_valid(self.valid, batch, length, name="context.valid", device=device)
        if self.block_ids is not None:
            check_tensor("context.block_ids", self.block_ids, shape=(length,))
            _check_device("context.block_ids", self.block_ids, device)
        check_experts_per_token(self.experts_per_token, batch, device)
        return self


def check_experts_per_token(k_B: Tensor | None, batch: int, device: torch.device) -> None:
    """`context.experts_per_token` (if any) must be [B] on the routed input's device."""
    if k_B is not None:
        check_tensor("context.experts_per_token", k_B, shape=(batch,))
        _check_device("context.experts_per_token", k_B, device)


def check_valid(
    valid: object, batch: int | None, length: int | None, *, name: str = "valid", device: torch.device | None = None
) -> Tensor:
    """`valid` must be a bool [B, L] tensor (B, L unchecked where None)."""
    valid = check_tensor(name, valid, shape=(batch, length))
    if valid.dtype != torch.bool:
        raise ValueError(f"{name} must be a bool tensor (False = padding), got dtype {valid.dtype}")
    _check_device(name, valid, device)
    return valid


def check_block_ids(
    block_ids: object, length: int | None, *, name: str = "block_ids", device: torch.device | None = None
) -> Tensor:
    """`block_ids` must be an integer [L] tensor, non-decreasing (blocks are runs of equal ids)."""
    block_ids = check_tensor(name, block_ids, shape=(length,), floating=False)
    if block_ids.dtype == torch.bool:
        raise ValueError(f"{name} must be an int64 tensor, got dtype torch.bool")
    _check_device(name, block_ids, device)
    if block_ids.numel() > 1 and bool((block_ids[1:] < block_ids[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing (one block per run of equal ids), got {block_ids.tolist()}")
    return block_ids


def _check_device(name: str, value: Tensor, device: torch.device | None) -> None:
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on the routed input's device {device}, got {value.device}")


__all__ = ["RoutingContext", "check_block_ids", "check_experts_per_token", "check_valid"]
