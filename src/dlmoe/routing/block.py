"""Block-level expert routing (dMoE): the tokens of a block vote for a small expert coreset.

For each block of a sequence — `block_size` consecutive positions, or the runs of equal
`block_ids` (the sampler's decoding blocks) — with padding (`valid` False) left out:
  1. each token keeps its top-k (biased) scores, zeros elsewhere;
  2. votes v = Σ_tokens of those, normalised to sum 1;
  3. coreset = smallest set of experts, by descending vote, whose cumulative vote exceeds top_p
     (dMoE: an expert is kept while the vote mass ranked above it is ≤ top_p, so reaching top_p
     exactly also takes the next expert; only voted experts; always the top-1), enlarged to at
     least `guard` experts;
  4. each token's top-k (group-limited where the model has groups) restricted to the coreset;
     gates = its unbiased scores renormalised over its chosen experts, times the scaling factor.
Fewer unique experts per forward means fewer expert weights streamed from memory.

A last, shorter block (L not a multiple of block_size) votes among its own tokens only — unlike
the reference code, whose -inf padding turns those votes into NaN.

Letters: B batch, L length, P blocks, E experts, K top-k, N tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlmoe._checks import check_float, check_int, check_tensor
from dlmoe.routing.config import BlockRoutingConfig
from dlmoe.routing.context import check_block_ids, check_valid
from dlmoe.routing.dispatch import Dispatch, expert_counts, sorted_dispatch_from_topk
from dlmoe.routing.token_choice import TopKRule, _check_tc_args, route_topk_scores, scaled_gates, weighted_z_loss


def block_layout(length: int, block_size: int, block_ids: Tensor | None, device: torch.device) -> tuple[Tensor, int]:
    """([L] int64 block of each position, number of blocks P).

    Default: runs of `block_size` positions; with `block_ids` [L] (non-decreasing), one block per
    run of equal ids — the sampler's decoding blocks, whatever their lengths.
    """
    if block_ids is None:
        return torch.arange(length, device=device) // block_size, -(-length // block_size)
    ids_P, block_L = torch.unique_consecutive(block_ids, return_inverse=True)
    return block_L, ids_P.numel()


def topk_kept(choice_BLE: Tensor, k: int | Tensor) -> Tensor:
    """[B, L, E]: each token's top-k values, zeros elsewhere; `k` an int or per row [B] (ranks ≥ k_b dropped)."""
    if not isinstance(k, Tensor):
        values_BLK, experts_BLK = choice_BLE.topk(k, dim=-1)
    else:
        values_BLK, experts_BLK = choice_BLE.topk(int(k.max()), dim=-1)
        rank_K = torch.arange(values_BLK.shape[-1], device=choice_BLE.device)
        values_BLK = torch.where(rank_K < k.view(-1, 1, 1), values_BLK, 0.0)
    return torch.zeros_like(choice_BLE).scatter_(-1, experts_BLK, values_BLK)


def sum_by_block(x_BLE: Tensor, block_L: Tensor, num_blocks: int, valid_BL: Tensor | None = None) -> Tensor:
    """[B, P, E] float64: sums of `x` over the (valid) positions of each block.

    Differences of float64 prefix sums: one pass for blocks of any lengths, and (on the CPU, where
    the scan is sequential) a row's sums do not change when padding is added in front of it.
    """
    batch, _, num_experts = x_BLE.shape
    x_BLE = x_BLE.double()
    if valid_BL is not None:
        x_BLE = x_BLE.masked_fill(~valid_BL.unsqueeze(-1), 0.0)
    prefix_BLE = torch.cat([x_BLE.new_zeros(batch, 1, num_experts), x_BLE.cumsum(1)], dim=1)  # [B, L+1, E]
    ends_P = expert_counts(block_L, num_blocks).cumsum(0)  # positions per block (no host read)
    starts_P = torch.cat([ends_P.new_zeros(1), ends_P[:-1]])
    return prefix_BLE[:, ends_P] - prefix_BLE[:, starts_P]


def normalised_votes(
    choice_BLE: Tensor, k: int | Tensor, block_L: Tensor, num_blocks: int, valid_BL: Tensor | None
) -> Tensor:
    """[B, P, E] votes in the dtype of `choice_BLE`, summing to 1 per block (0 where nothing voted)."""
    votes_BPE = sum_by_block(topk_kept(choice_BLE, k), block_L, num_blocks, valid_BL)
    return (votes_BPE / votes_BPE.sum(-1, keepdim=True).clamp_min(1e-20)).to(choice_BLE.dtype)


def block_votes(
    choice_BLE: Tensor,
    k: int | Tensor,
    block_size: int = 32,
    *,
    block_ids: Tensor | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """[B, P, E] normalised votes: per block, the sum of each valid token's top-k (biased) scores."""
    block_L, num_blocks = block_layout(choice_BLE.shape[1], block_size, block_ids, choice_BLE.device)
    return normalised_votes(choice_BLE, k, block_L, num_blocks, valid)


def top_p_coreset(votes_BPE: Tensor, top_p: float, guard: int) -> Tensor:
    """[B, P, E] bool: the smallest top-voted set whose cumulative vote exceeds top_p, at least `guard` large.

    dMoE's rule: sorted by descending vote, expert j is kept while the vote mass ranked above it
    is ≤ top_p (its `cum ≤ p` plus the first expert past p): a mass of exactly top_p also takes
    the next voted expert. Always the top-1; then the top-`guard` experts by vote (zero votes
    included: a block with fewer voted experts, or none, still gets `guard`).

    Only voted experts enter by the top-p rule: a mass before them of exactly the total (top_p = 1)
    would otherwise add every zero-vote expert. The mass is the exclusive float64 prefix sum of
    the sorted votes, compared with top_p · (their sum): exact for votes exact in binary, and
    independent of how far the normalised votes' sum is rounded from 1 (top_p = 1 keeps every
    voted expert).
    """
    sorted_votes, order = votes_BPE.double().sort(dim=-1, descending=True, stable=True)
    cum = sorted_votes.cumsum(-1)
    before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)  # mass ranked strictly above
    rank = torch.arange(votes_BPE.shape[-1], device=votes_BPE.device)
    within = before <= top_p * cum[..., -1:]
    take_sorted = (within & (sorted_votes > 0)) | (rank == 0) | (rank < guard)
    return torch.zeros_like(take_sorted).scatter_(-1, order, take_sorted)


def block_route(
    scores: Tensor,
    k: int,
    *,
    block_size: int = 32,
    block_ids: Tensor | None = None,
    valid: Tensor | None = None,
    top_p: float = 0.6,
    guard: int = 16,
    expert_bias: Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    renormalize: bool = True,
    routed_scaling_factor: float = 1.0,
    bias_in_gate: bool = False,
) -> Dispatch:
    """dMoE block routing on routing scores.

    Args:
        scores: [B, L, E] float routing scores (sigmoid or softmax of the router logits).
        k: experts per token.
        block_size: positions per block (the decoding block; 32 in dMoE); unused with `block_ids`.
        block_ids: [L] int64 non-decreasing, shared by all rows: one block per run of equal ids.
        valid: [B, L] bool; padding (False) casts no vote and gets no slot.
        top_p: vote mass the coreset must exceed (dMoE: reaching it exactly takes one expert more), in (0, 1].
        guard: minimum coreset size, 1 ≤ guard ≤ E (16 in dMoE).
        expert_bias: [E] bias added to the scores for voting and selection only.
        n_group, topk_group: group-limited top-k inside the coreset (LLaDA2).
        renormalize: renormalise each token's gates over its chosen experts.
        routed_scaling_factor: multiplies the gates.
        bias_in_gate: gates from the biased scores (LLaDA-MoE; see `token_choice`).

    Returns:
        Dispatch with `coreset_mask`, `block_votes` [B, P, E] and `block_index` [L] set (and
        `block_size` for the default blocks). A token whose allowed experts number fewer than k
        (guard < k, or groups) gets only the allowed ones. No router loss (`aux_loss` 0).
    """
    scores = check_tensor("scores", scores, ndim=3, floating=True)
    batch, length, num_experts = scores.shape
    _check_tc_args(num_experts, k, None, expert_bias, n_group, topk_group, routed_scaling_factor)
    check_int("block_size", block_size, low=1)
    check_float("top_p", top_p, low=0.0, high=1.0, low_open=True)
    check_int("guard", guard, low=1, high=num_experts)
    if valid is not None:
        check_valid(valid, batch, length, device=scores.device)
    if block_ids is not None:
        check_block_ids(block_ids, length, device=scores.device)
    rule = TopKRule(
        k, renormalize=renormalize, n_group=n_group, topk_group=topk_group,
        routed_scaling_factor=routed_scaling_factor, bias_in_gate=bias_in_gate,
    )  # fmt: skip
    block = BlockRoutingConfig(block_size=block_size, top_p=top_p, guard=guard)
    return _block_route(scores, rule, block, block_ids=block_ids, valid=valid, expert_bias=expert_bias)


def _block_route(
    scores: Tensor,
    rule: TopKRule,
    block: BlockRoutingConfig,
    *,
    block_ids: Tensor | None = None,
    valid: Tensor | None = None,
    expert_bias: Tensor | None = None,
    num_valid: int | None = None,
    z_logits: Tensor | None = None,
) -> Dispatch:
    """`block_route` on checked arguments (`rule.score` unused: `scores` are given). With
    `z_logits` [B, L, E] (training), `aux_loss` = rule.z_loss_coef · z-loss of the valid tokens."""
    batch, length, num_experts = scores.shape
    k = rule.k
    assert block.guard <= num_experts, f"block.guard={block.guard} > {num_experts} experts (checked by the caller)"
    scores = scores.float()
    block_size = min(block.block_size, length)
    block_L, num_blocks = block_layout(length, block_size, block_ids, scores.device)

    # 1-3. votes and coreset per block
    choice_BLE = scores.detach() if expert_bias is None else scores.detach() + expert_bias.float()
    votes_BPE = normalised_votes(choice_BLE, k, block_L, num_blocks, valid)
    coreset_BPE = top_p_coreset(votes_BPE, block.top_p, block.guard)

    # 4. each token's top-k inside its block's coreset
    allowed_NE = coreset_BPE[:, block_L].reshape(-1, num_experts)
    scores_NE = scores.reshape(-1, num_experts)
    expert_NK, valid_NK = route_topk_scores(
        scores_NE, k, expert_bias=expert_bias, n_group=rule.n_group, topk_group=rule.topk_group, allowed_NE=allowed_NE
    )
    gate_NK = scaled_gates(scores_NE, expert_NK, rule, expert_bias, pick_NK=valid_NK)
    num_routed = batch * length
    if valid is not None:  # padding gets no slot
        valid_NK = valid_NK & valid.reshape(-1, 1)
        num_routed = num_valid if num_valid is not None else int(valid.sum())
    token_S, expert_S, gate_S, counts = sorted_dispatch_from_topk(expert_NK, gate_NK, num_experts, valid_NK=valid_NK)
    aux = scores.new_zeros(())
    if z_logits is not None:
        aux = aux + weighted_z_loss(z_logits.reshape(-1, num_experts).float(), rule.z_loss_coef, valid, num_routed)
    return Dispatch(
        token_index=token_S,
        expert_index=expert_S,
        gate=gate_S,
        counts=counts,
        num_tokens=batch * length,
        batch_shape=(batch, length),
        num_requested_slots=num_routed * k,
        aux_loss=aux,
        coreset_mask=coreset_BPE,
        block_size=block_size if block_ids is None else None,
        block_index=block_L,
        valid=valid,
        block_votes=votes_BPE.detach(),
    )


__all__ = [
    "block_layout",
    "block_route",
    "block_votes",
    "normalised_votes",
    "sum_by_block",
    "top_p_coreset",
    "topk_kept",
]
