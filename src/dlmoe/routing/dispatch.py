"""Dispatch: the one currency between routers and experts.

Every router (token choice, expert choice, block routing) returns a `Dispatch`; the expert
compute, the combine step, metrics and expert parallelism only ever see this structure.

A *slot* is one (token, expert) assignment. Slots are sorted by expert, so expert `e` owns the
contiguous rows `offsets[e] : offsets[e] + counts[e]` of the gathered activations.

Letters: B batch, L length, N = B·L tokens, E experts, S slots, D model width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class RoutingStats:
    """Load and coverage figures of one routing decision (all plain floats, detached).

    `load` is the number of slots per expert; `dropped_fraction` counts token-slots lost to
    capacity limits (TC with a capacity factor); `zero_expert_fraction` counts tokens that no
    expert processes (EC; they keep only the residual and shared-expert path).
    """

    load: list[float]
    load_max_over_mean: float
    dropped_fraction: float
    zero_expert_fraction: float
    experts_per_token_mean: float
    experts_per_token_min: float
    experts_per_token_max: float
    unique_experts: int
    unique_experts_per_block: float | None = None

    def as_dict(self) -> dict[str, float]:
        """Scalar figures only (per-expert `load` left out), for logs and JSON."""
        out = {k: v for k, v in self.__dict__.items() if k != "load" and v is not None}
        return out


@dataclass(frozen=True)
class Dispatch:
    """Which token goes to which expert, with what combine weight.

    Attributes:
        token_index:  [S] int64, flattened token (b·L + l) carried by each slot.
        expert_index: [S] int64, expert of each slot; non-decreasing (slots sorted by expert).
        gate:         [S] float32, combine weight; differentiable w.r.t. the router logits.
        counts:       [E] int64, slots per expert (`offsets = cumsum(counts)`).
        num_tokens:   N, tokens the router saw.
        batch_shape:  (B, L) of the routed input.
        num_requested_slots: slots before capacity dropping (N·k for TC), for the drop fraction.
        aux_loss:     scalar float32, router losses to add to the objective (0 if none).
        equal_counts: every expert holds the same number of slots (EC): experts may use a
            dense [E, C, D] bmm without reading `counts` back from the device.
        coreset_mask: [B, P, E] bool for block routing (the experts a block may use).
        block_votes:  [B, P, E] float, block routing's normalised votes (detached): per block, each
            expert's share of its tokens' top-k scores. > 0 exactly for the experts plain token
            routing would have used in the block, so a viewer can set the coreset against them.
        block_size:   block length of block routing with the default blocks, else None.
        requested_counts: [E] int64 slots per expert before capacity dropping (None: = counts).
        block_index:  [L] int64 in 0..P-1, the routing block of each position (block routing).
        valid:        [B, L] bool, the tokens that were routed (False = padding); None = all.
    """

    token_index: Tensor
    expert_index: Tensor
    gate: Tensor
    counts: Tensor
    num_tokens: int
    batch_shape: tuple[int, int]
    num_requested_slots: int
    aux_loss: Tensor
    equal_counts: bool = False
    coreset_mask: Tensor | None = field(default=None)
    block_size: int | None = None
    requested_counts: Tensor | None = None
    block_index: Tensor | None = None
    valid: Tensor | None = None
    block_votes: Tensor | None = None

    def __post_init__(self) -> None:
        if self.requested_counts is None:
            object.__setattr__(self, "requested_counts", self.counts)

    @property
    def num_experts(self) -> int:
        return self.counts.numel()

    @property
    def num_slots(self) -> int:
        return self.token_index.numel()

    def gather(self, x_ND: Tensor) -> Tensor:
        """Rows of `x_ND` in slot order: [S, D]. Backward is a scatter-add into x."""
        return x_ND.index_select(0, self.token_index)

    def combine(self, y_SD: Tensor, *, apply_gate: bool = True) -> Tensor:
        """Sum slot outputs back into tokens: out[t] = Σ_{s: tok(s)=t} gate_s · y_s.

        `apply_gate=False` when the experts already scaled their rows by the gate. Tokens no
        expert processed get exact zeros. Output dtype is that of `y_SD`.
        """
        weighted_SD = y_SD * self.gate.to(y_SD.dtype).unsqueeze(-1) if apply_gate else y_SD
        out_ND = y_SD.new_zeros(self.num_tokens, y_SD.shape[-1])
        return out_ND.index_add(0, self.token_index, weighted_SD)

    def experts_per_token(self) -> Tensor:
        """[N] int64, how many experts process each token (index_add: no host sync, unlike bincount,
        which reads the largest index back to size its output)."""
        count_N = torch.zeros(self.num_tokens, dtype=torch.int64, device=self.token_index.device)
        return count_N.index_add_(0, self.token_index, torch.ones_like(self.token_index))

    def unique_experts(self, token_mask: Tensor) -> Tensor:
        """[B] int64: distinct experts used by the slots of the tokens selected by `token_mask` [B, L] bool.

        E.g. the experts a decoding step streams for the still-masked tokens of each row; rows with
        no selected token give 0.
        """
        return (self.expert_load(token_mask) > 0).sum(-1)

    def expert_load(self, token_mask: Tensor) -> Tensor:
        """[B, E] int64: slots per expert of the tokens selected by `token_mask` [B, L] bool, per row.

        A weighted index_add over all slots: no host sync (a bool index would read its count back).
        """
        batch, length = self.batch_shape
        if token_mask.shape != (batch, length) or token_mask.dtype != torch.bool:
            raise ValueError(
                f"token_mask must be a bool tensor of shape {(batch, length)}, "
                f"got {token_mask.dtype} of shape {tuple(token_mask.shape)}"
            )
        keep_S = token_mask.reshape(-1)[self.token_index].long()
        cell_S = (self.token_index // length) * self.num_experts + self.expert_index
        load = torch.zeros(batch * self.num_experts, dtype=torch.int64, device=self.token_index.device)
        return load.index_add_(0, cell_S, keep_S).view(batch, self.num_experts)

    def slots_per_row(self) -> Tensor:
        """[B] int64: slots whose token lies in each row (the row's routed compute)."""
        batch, length = self.batch_shape
        return expert_counts(self.token_index // length, batch)  # counts per row: the same index_add

    def stats(self, block_size: int | None = None) -> RoutingStats:
        """Compute load-balance and coverage statistics (syncs with the device).

        Per-token figures count routed (valid) tokens only. `block_size` adds the mean number of
        unique experts per block of `block_size` consecutive positions of each sequence — dMoE's
        metric; by default the dispatch's own routing blocks are used, if any.
        """
        with torch.no_grad():
            load = self.counts.float()
            per_token = self.experts_per_token().float()
            if self.valid is not None:
                per_token = per_token[self.valid.reshape(-1)]
                if per_token.numel() == 0:  # nothing routed: report zeros rather than NaN
                    per_token = per_token.new_zeros(1)
            mean_load = load.mean().clamp_min(1e-12)
            kept = self.num_slots
            requested = max(self.num_requested_slots, 1)
            per_block = None
            if block_size is not None or self.block_index is not None or self.block_size is not None:
                per_block = _mean_over_routed_blocks(self, block_size)
            return RoutingStats(
                load=load.tolist(),
                load_max_over_mean=(load.max() / mean_load).item(),
                dropped_fraction=max(self.num_requested_slots - kept, 0) / requested,
                zero_expert_fraction=(per_token == 0).float().mean().item(),
                experts_per_token_mean=per_token.mean().item(),
                experts_per_token_min=per_token.min().item(),
                experts_per_token_max=per_token.max().item(),
                unique_experts=int((self.counts > 0).sum().item()),
                unique_experts_per_block=per_block,
            )


def _mean_over_routed_blocks(dispatch: Dispatch, block_size: int | None) -> float:
    """Mean of `unique_experts_per_block` over the (row, block) pairs that hold a routed token."""
    per_block_BP = unique_experts_per_block(dispatch, block_size).float()
    if dispatch.valid is None:
        return per_block_BP.mean().item()
    block_L, num_blocks = _blocks_of(dispatch, block_size)
    batch, _ = dispatch.batch_shape
    routed_BP = torch.zeros(batch, num_blocks, dtype=torch.int64, device=block_L.device)
    routed_BP.index_add_(1, block_L, dispatch.valid.long())
    per_block = per_block_BP[routed_BP > 0]
    return per_block.mean().item() if per_block.numel() else 0.0


def _blocks_of(dispatch: Dispatch, block_size: int | None) -> tuple[Tensor, int]:
    """([L] block of each position, number of blocks): `block_size` runs, else the dispatch's blocks."""
    _, length = dispatch.batch_shape
    device = dispatch.counts.device
    if block_size is None and dispatch.block_index is not None:
        mask = dispatch.coreset_mask
        num_blocks = mask.shape[1] if mask is not None else int(dispatch.block_index.max()) + 1
        return dispatch.block_index, num_blocks
    if block_size is None:
        block_size = dispatch.block_size
    if block_size is None:
        raise ValueError("block_size is required: this dispatch has no routing blocks")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    return torch.arange(length, device=device) // block_size, -(-length // block_size)


def unique_experts_per_block(dispatch: Dispatch, block_size: int | None = None) -> Tensor:
    """[B, P] int64: distinct experts used by the tokens of each block of each sequence.

    With `block_size`, blocks are consecutive runs of `block_size` positions (the last one may be
    shorter); without it, the dispatch's own routing blocks (`block_index`, block routing).
    """
    block_L, num_blocks = _blocks_of(dispatch, block_size)
    batch, length = dispatch.batch_shape
    num_experts = dispatch.num_experts
    b = dispatch.token_index // length
    blk = block_L[dispatch.token_index % length]
    used = torch.zeros(batch * num_blocks * num_experts, dtype=torch.bool, device=dispatch.counts.device)
    used[(b * num_blocks + blk) * num_experts + dispatch.expert_index] = True
    return used.view(batch, num_blocks, num_experts).sum(-1)


def expert_counts(expert_index: Tensor, num_experts: int, keep: Tensor | None = None) -> Tensor:
    """[E] int64: slots per expert (only the `keep` ones): index_add, no host sync (bincount reads
    the largest index back to size its output)."""
    expert_S = expert_index.reshape(-1)
    ones_S = torch.ones_like(expert_S) if keep is None else keep.reshape(-1).long()
    return torch.zeros(num_experts, dtype=torch.int64, device=expert_S.device).index_add_(0, expert_S, ones_S)


def sorted_dispatch_from_topk(
    expert_index_NK: Tensor,
    gate_NK: Tensor,
    num_experts: int,
    *,
    valid_NK: Tensor | None = None,
    num_slots: int | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flatten token-major top-k choices into expert-sorted slots.

    Returns (token_index [S], expert_index [S], gate [S], counts [E]); invalid picks are dropped.
    Within an expert, slots keep token order (stable sort), which makes results deterministic.
    `num_slots`: how many picks are valid, when the caller knows it: the invalid ones are sorted
    last and cut off, with no host sync (else they are filtered out, which reads their count).
    """
    num_tokens, k = expert_index_NK.shape
    device = expert_index_NK.device
    token_NK = torch.arange(num_tokens, device=device).unsqueeze(1).expand(num_tokens, k)
    expert_S = expert_index_NK.reshape(-1)
    token_S = token_NK.reshape(-1)
    gate_S = gate_NK.reshape(-1)
    counts = expert_counts(expert_S, num_experts, valid_NK)
    if valid_NK is None:
        order = torch.argsort(expert_S, stable=True)
    elif num_slots is None:
        keep = valid_NK.reshape(-1)
        expert_S, token_S, gate_S = expert_S[keep], token_S[keep], gate_S[keep]
        order = torch.argsort(expert_S, stable=True)
    else:  # the same order: valid picks by (expert, position), then the invalid ones
        dropped_S = (~valid_NK.reshape(-1)).long()
        order = torch.argsort(expert_S + num_experts * dropped_S, stable=True)[:num_slots]
    return token_S[order], expert_S[order], gate_S[order], counts
