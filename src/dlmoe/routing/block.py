"""Block-level expert routing (dMoE): the tokens of a block vote for a small expert coreset.

For each block of `block_size` consecutive positions of a sequence (the sampler's decoding block):
  1. each token keeps its top-k (biased) scores, zeros elsewhere;
  2. votes v = Σ_tokens of those, normalised to sum 1;
  3. coreset = smallest set of experts, by descending vote, whose cumulative vote reaches top_p
     (always the top-1), enlarged to at least `guard` experts;
  4. each token's top-k (group-limited where the model has groups) restricted to the coreset;
     gates = its unbiased scores renormalised over its chosen experts, times the scaling factor.
Fewer unique experts per forward means fewer expert weights streamed from memory.

A last, shorter block (L not a multiple of block_size) votes among its own tokens only — unlike
the reference code, whose -inf padding turns those votes into NaN.

Letters: B batch, L length, P = n_blocks, T block_size, E experts, K top-k, N tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlmoe._checks import check_float, check_int, check_tensor
from dlmoe.routing.dispatch import Dispatch, sorted_dispatch_from_topk
from dlmoe.routing.token_choice import _check_tc_args, route_topk_scores


def block_votes(choice_BLE: Tensor, k: int, block_size: int) -> Tensor:
    """[B, P, E] normalised votes: per block, the sum of each token's top-k (biased) scores."""
    batch, length, num_experts = choice_BLE.shape
    num_blocks = -(-length // block_size)
    values_BLK, experts_BLK = choice_BLE.topk(k, dim=-1)
    kept_BLE = torch.zeros_like(choice_BLE).scatter_(-1, experts_BLK, values_BLK)
    pad = num_blocks * block_size - length
    if pad:  # padded rows contribute nothing
        kept_BLE = torch.cat([kept_BLE, kept_BLE.new_zeros(batch, pad, num_experts)], dim=1)
    votes_BPE = kept_BLE.view(batch, num_blocks, block_size, num_experts).sum(2)
    return votes_BPE / votes_BPE.sum(-1, keepdim=True).clamp_min(1e-20)


def top_p_coreset(votes_BPE: Tensor, top_p: float, guard: int) -> Tensor:
    """[B, P, E] bool: smallest top-voted set with cumulative vote ≥ top_p, at least `guard` large.

    Experts with no vote are never needed to reach top_p (exactly, votes sum to 1); excluding
    them keeps fp rounding of the cumulative sum (e.g. 0.99999994 < 1.0) from adding them all.
    """
    sorted_votes, order = votes_BPE.double().sort(dim=-1, descending=True, stable=True)
    before = sorted_votes.cumsum(-1) - sorted_votes  # vote mass ranked strictly above each expert
    rank = torch.arange(votes_BPE.shape[-1], device=votes_BPE.device)
    # includes the expert that crosses top_p; always the top-1; then enlarged to `guard`
    take_sorted = ((before < top_p) & (sorted_votes > 0)) | (rank == 0) | (rank < guard)
    return torch.zeros_like(take_sorted).scatter_(-1, order, take_sorted)


def block_route(
    scores: Tensor,
    k: int,
    *,
    block_size: int = 32,
    top_p: float = 0.6,
    guard: int = 16,
    expert_bias: Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
) -> Dispatch:
    """dMoE block routing on routing scores.

    Args:
        scores: [B, L, E] float routing scores (sigmoid or softmax of the router logits).
        k: experts per token.
        block_size: positions per block (the decoding block; 32 in dMoE).
        top_p: vote mass the coreset must cover, in (0, 1].
        guard: minimum coreset size, 1 ≤ guard ≤ E (16 in dMoE).
        expert_bias: [E] bias added to the scores for voting and selection only.
        n_group, topk_group: group-limited top-k inside the coreset (LLaDA2).
        renormalize: renormalise each token's gates over its chosen experts.
        routed_scaling_factor: multiplies the gates.

    Returns:
        Dispatch with `coreset_mask` [B, P, E] and `block_size` set. A token whose allowed
        experts number fewer than k (guard < k, or groups) gets only the allowed ones.
    """
    scores = check_tensor("scores", scores, ndim=3, floating=True)
    batch, length, num_experts = scores.shape
    _check_tc_args(num_experts, k, None, expert_bias, n_group, topk_group, routed_scaling_factor)
    check_int("block_size", block_size, low=1)
    check_float("top_p", top_p, low=0.0, high=1.0, low_open=True)
    check_int("guard", guard, low=1, high=num_experts)
    scores = scores.float()
    block_size = min(block_size, length)

    # 1-3. votes and coreset per block
    choice_BLE = scores.detach() if expert_bias is None else scores.detach() + expert_bias.float()
    coreset_BPE = top_p_coreset(block_votes(choice_BLE, k, block_size), top_p, guard)

    # 4. each token's top-k inside its block's coreset
    block_of_L = torch.arange(length, device=scores.device) // block_size
    allowed_NE = coreset_BPE[:, block_of_L].reshape(-1, num_experts)
    scores_NE = scores.reshape(-1, num_experts)
    expert_NK, valid_NK = route_topk_scores(
        scores_NE, k, expert_bias=expert_bias, n_group=n_group, topk_group=topk_group, allowed_NE=allowed_NE
    )
    gate_NK = scores_NE.gather(1, expert_NK) * valid_NK
    if renormalize:
        gate_NK = gate_NK / (gate_NK.sum(-1, keepdim=True) + 1e-20)
    if routed_scaling_factor != 1.0:
        gate_NK = gate_NK * routed_scaling_factor
    token_S, expert_S, gate_S, counts = sorted_dispatch_from_topk(expert_NK, gate_NK, num_experts, valid_NK=valid_NK)
    return Dispatch(
        token_index=token_S,
        expert_index=expert_S,
        gate=gate_S,
        counts=counts,
        num_tokens=batch * length,
        batch_shape=(batch, length),
        num_requested_slots=batch * length * k,
        aux_loss=scores.new_zeros(()),
        coreset_mask=coreset_BPE,
        block_size=block_size,
    )


__all__ = ["block_route", "block_votes", "top_p_coreset"]
