"""Expert-choice block routing: a block's tokens vote a small expert coreset, expert choice runs inside it.

dMoE block-routes token choice only; this is the expert-choice counterpart (no published system
has it). Why: at inference, the experts a decoding block touches are the expert weights streamed
from memory, and plain EC spreads every block over all E experts. Here each block first votes a
coreset (as dMoE), then spends the same per-token budget n·k_b on the coreset experts only:
fewer unique experts per block, same compute.

Per row b and block p (the runs of `block_ids`, default `block_size` positions), padding left out:
  1. votes: each valid token keeps its top-k_b softmax scores (zeros elsewhere); summed over the
     block and normalised;
  2. coreset: `top_p_coreset(votes, top_p, guard)`, m_{b,p} experts;
  3. capacity C_{b,p} = min(max(⌊n_{b,p}·k_b/m_{b,p}⌋, 1), n_{b,p}) for n_{b,p} valid tokens
     (0 for a block without any), so the block holds m·C ≤ n·k_b slots (more only through the
     floor of 1, when n·k_b < m);
  4. every coreset expert takes the C_{b,p} valid tokens of the block with the largest logit
     ("logit") or softmax score ("score"); experts outside the coreset take nothing;
  5. gates as `expert_choice`: softmax over the experts that chose the token ("restricted"), the
     full softmax score ("full"), or sigmoids normalised over the choosing experts ("restricted_sigmoid").
Counts differ across experts (`equal_counts=False`). A row routes the same padded or alone.

Letters: B batch, L length, P blocks, E experts, N = B·L tokens, S slots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlmoe._checks import check_choice, check_float, check_int
from dlmoe.routing.block import block_layout, normalised_votes, top_p_coreset
from dlmoe.routing.capacity import ec_capacity
from dlmoe.routing.config import BlockRoutingConfig
from dlmoe.routing.context import check_block_ids, check_valid
from dlmoe.routing.dispatch import Dispatch, expert_counts
from dlmoe.routing.expert_choice import GATES, SELECT, ExpertChoiceRule, _check_k, ec_gates, ec_z_loss
from dlmoe.routing.token_choice import check_logits


def block_capacities(k_B: Tensor, valid_BL: Tensor, block_L: Tensor, coreset_BPE: Tensor) -> Tensor:
    """[B, P] int64 C_{b,p} = min(max(⌊n·k_b/m⌋, 1), n): n valid tokens, m coreset experts of the block
    (`capacity.ec_capacity` with the coreset as the experts)."""
    batch, num_blocks, _ = coreset_BPE.shape
    n_BP = torch.zeros(batch, num_blocks, dtype=torch.int64, device=valid_BL.device)
    n_BP.index_add_(1, block_L, valid_BL.long())
    m_BP = coreset_BPE.sum(-1).clamp_min(1)
    return ec_capacity(k_B.view(-1, 1), n_BP, m_BP)  # type: ignore[return-value]


def rank_within_blocks(values_BLE: Tensor, block_L: Tensor, num_blocks: int) -> Tensor:
    """[B, L, E] int64: rank of each token among its block's tokens, per expert, by descending value.

    Blocks are contiguous runs of positions: a stable sort by block of the value-sorted order
    puts block p's tokens at [start_p, end_p), so rank = sorted position − start_p.
    """
    order_BEL = values_BLE.transpose(1, 2).argsort(dim=-1, descending=True, stable=True)
    order_BEL = order_BEL.gather(-1, block_L[order_BEL].argsort(dim=-1, stable=True))
    sizes_P = expert_counts(block_L, num_blocks)  # positions per block (no host read)
    starts_P = sizes_P.cumsum(0) - sizes_P
    sorted_pos_L = torch.arange(block_L.numel(), device=block_L.device)
    rank_BEL = torch.empty_like(order_BEL)
    rank_BEL.scatter_(-1, order_BEL, sorted_pos_L - starts_P[block_L[order_BEL]])
    return rank_BEL.transpose(1, 2)


def block_expert_choice(
    logits: Tensor,
    k: int | Tensor,
    *,
    block_size: int = 32,
    block_ids: Tensor | None = None,
    valid: Tensor | None = None,
    top_p: float = 0.6,
    guard: int = 16,
    select: str = "logit",
    gate: str = "restricted",
    z_loss_coef: float = 0.0,
) -> Dispatch:
    """Expert choice inside each block's voted coreset (see the module docstring).

    Args:
        logits: [B, L, E] float router logits.
        k: per-token budget: an int, or [B] int64 per row (a capacity schedule or an inference
            override), each in [1, E].
        block_size: positions per block; unused with `block_ids`.
        block_ids: [L] int64 non-decreasing, shared by all rows: one block per run of equal ids.
        valid: [B, L] bool; padding (False) casts no vote, counts toward no capacity, is never chosen.
        top_p, guard: coreset vote mass in (0, 1] and minimum size in [1, E].
        select: rank a block's tokens by logit ("logit") or softmax score ("score").
        gate: "restricted" or "restricted_sigmoid" (a chosen token's gates sum to 1), or "full".
        z_loss_coef: weight of the router z-loss over the valid tokens.

    Returns:
        Dispatch with `coreset_mask`, `block_votes` [B, P, E] and `block_index` [L]; `equal_counts=False`.
    """
    logits = check_logits(logits)
    batch, length, num_experts = logits.shape
    k = _check_k(k, batch, num_experts)
    check_int("block_size", block_size, low=1)
    check_float("top_p", top_p, low=0.0, high=1.0, low_open=True)
    check_int("guard", guard, low=1, high=num_experts)
    check_choice("select", select, SELECT)
    check_choice("gate", gate, GATES)
    check_float("z_loss_coef", z_loss_coef, low=0.0)
    if valid is not None:
        check_valid(valid, batch, length, device=logits.device)
    if block_ids is not None:
        check_block_ids(block_ids, length, device=logits.device)
    rule = ExpertChoiceRule(select=select, gate=gate, z_loss_coef=z_loss_coef)
    block = BlockRoutingConfig(block_size=block_size, top_p=top_p, guard=guard)
    return _block_expert_choice(logits, k, rule, block, block_ids=block_ids, valid=valid)


def _block_expert_choice(
    logits: Tensor,
    k: int | Tensor,
    rule: ExpertChoiceRule,
    block: BlockRoutingConfig,
    *,
    block_ids: Tensor | None = None,
    valid: Tensor | None = None,
    losses: bool = True,
) -> Dispatch:
    """`block_expert_choice` on checked arguments (`rule.pool` unused: the blocks are the pools)."""
    batch, length, num_experts = logits.shape
    logits = logits.float()
    device = logits.device
    block_size = min(block.block_size, length)
    block_L, num_blocks = block_layout(length, block_size, block_ids, device)
    valid_BL = valid if valid is not None else torch.ones(batch, length, dtype=torch.bool, device=device)
    k_B = k.long().to(device) if isinstance(k, Tensor) else torch.full((batch,), k, dtype=torch.int64, device=device)

    # 1-2. votes from the softmax scores, coreset per block
    probs_BLE = torch.softmax(logits.detach(), dim=-1)
    votes_BPE = normalised_votes(probs_BLE, k_B if isinstance(k, Tensor) else k, block_L, num_blocks, valid)
    coreset_BPE = top_p_coreset(votes_BPE, block.top_p, block.guard)

    # 3-4. inside each block, every coreset expert takes its top-C valid tokens
    capacity_BP = block_capacities(k_B, valid_BL, block_L, coreset_BPE)
    rank_BLE = logits.detach() if rule.select == "logit" else probs_BLE
    rank_BLE = rank_within_blocks(rank_BLE.masked_fill(~valid_BL.unsqueeze(-1), float("-inf")), block_L, num_blocks)
    chosen_BLE = (rank_BLE < capacity_BP[:, block_L].unsqueeze(-1)) & coreset_BPE[:, block_L] & valid_BL.unsqueeze(-1)

    # 5. expert-major slots (token order within an expert), EC gates
    chosen_EN = chosen_BLE.reshape(-1, num_experts).T
    expert_S, token_S = chosen_EN.nonzero(as_tuple=True)
    logits_NE = logits.reshape(-1, num_experts)
    return Dispatch(
        token_index=token_S,
        expert_index=expert_S,
        gate=ec_gates(logits_NE, token_S, expert_S, rule.gate),
        counts=chosen_EN.sum(1),
        num_tokens=batch * length,
        batch_shape=(batch, length),
        num_requested_slots=token_S.numel(),
        aux_loss=ec_z_loss(logits_NE, rule.z_loss_coef if losses else 0.0, valid),
        equal_counts=False,
        coreset_mask=coreset_BPE,
        block_size=block_size if block_ids is None else None,
        block_index=block_L,
        valid=valid,
        block_votes=votes_BPE.detach(),
    )


__all__ = ["block_capacities", "block_expert_choice", "rank_within_blocks"]
