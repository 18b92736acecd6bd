"""Expert-choice (EC) routing: each expert picks its top-C tokens (Zhou et al. 2022; EC-DLM).

Bidirectional diffusion LMs see the whole sequence at once, so an expert can choose among the
tokens of a sequence without leaking the future — the reason EC suits DLMs. Every expert gets
exactly C tokens (perfect balance, no drops); a token may get 0..E experts.

Per-sample capacity: with k given per sequence (from the mask ratio, see `schedules`),
C_b = max(⌊L·k_b/E⌋, 1). The batch runs one top-k with max_b C_b and keeps slots j < C_b;
every expert still holds Σ_b C_b slots, so the expert compute stays a dense bmm.

Padding (`valid` False, a sampler's left-padded batch) is never chosen, and capacities count
valid tokens only, C_b = min(max(⌊n_b·k_b/E⌋, 1), n_b): a row routes the same padded or alone.

Letters: B batch, L length, N = B·L tokens, E experts, C capacity, S slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from dlmoe._checks import check_choice, check_float, check_int, check_tensor
from dlmoe.routing.capacity import PoolCapacity, capacity_for_budget, pool_capacity
from dlmoe.routing.context import check_valid
from dlmoe.routing.dispatch import Dispatch
from dlmoe.routing.token_choice import check_logits, weighted_z_loss
from dlmoe.vocab import GATES, POOLS, SELECT

_MASKED = -1e30  # finite "minus infinity": keeps softmax rows with no chosen expert NaN-free


def _check_k(k: int | Tensor, batch: int, num_experts: int) -> int | Tensor:
    if isinstance(k, Tensor):
        check_tensor("k", k, shape=(batch,), floating=False)
        if bool(((k < 1) | (k > num_experts)).any()):
            raise ValueError(f"k must lie in [1, {num_experts}] for every sample, got {k.tolist()}")
        return k
    return check_int("k", k, low=1, high=num_experts)


def ec_capacities(
    k: int | Tensor, batch: int, length: int, num_experts: int, pool: str, valid: Tensor | None = None
) -> tuple[Tensor, int]:
    """Capacity of each pool and the largest one (`capacity.ec_capacity` per pool).

    C_p = min(max(⌊n_p·k/E⌋, 1), n_p) with n_p the valid tokens of the pool (0 for an empty pool);
    "sequence": one pool per row with its own k_b; "batch": one pool, n·k summed over the rows.
    Returns (capacity_P int64, max capacity) with P = B pools for "sequence" and P = 1 for "batch".
    """
    device = valid.device if valid is not None else k.device if isinstance(k, Tensor) else torch.device("cpu")
    capacity = pool_capacity(k, batch, length, num_experts, pool, valid, device)
    return capacity.per_pool, capacity.max


@dataclass(frozen=True)
class ExpertChoiceRule:
    """Which tokens an expert ranks and how it weights them: the part of `ExpertChoiceConfig` the
    functional router reads (a router builds it once, `rule_of(ExpertChoiceRule, config)`)."""

    pool: str = "sequence"
    select: str = "logit"
    gate: str = "restricted"
    z_loss_coef: float = 0.0


def expert_choice(
    logits: Tensor,
    k: int | Tensor,
    *,
    pool: str = "sequence",
    select: str = "logit",
    gate: str = "restricted",
    z_loss_coef: float = 0.0,
    valid: Tensor | None = None,
) -> Dispatch:
    """Expert-choice routing on router logits.

    Args:
        logits: [B, L, E] float router logits.
        k: average experts per token: an int, or a [B] int tensor (per-sample capacity, e.g.
            from `schedules.dynamic_k` of the mask ratio). Capacity C_b = max(⌊L·k_b/E⌋, 1).
        pool: "sequence" (each expert picks C_b tokens inside every sequence; EC-DLM default)
            or "batch" (each expert picks C = max(⌊L·Σ_b k_b/E⌋, 1) tokens of the whole batch).
        select: rank tokens by the raw logit l_{t,e} ("logit", EC-DLM) or by the per-token
            softmax score softmax(l_t)_e ("score", Zhou et al.) — not equivalent.
        gate: "restricted" = softmax of l_t over the experts that chose t (EC-DLM; a chosen
            token's gates sum to 1); "full" = the full softmax score softmax(l_t)_e (Zhou et al.);
            "restricted_sigmoid" = σ(l_{t,e}) / Σ_{e'∈S(t)} σ(l_{t,e'}) over the experts S(t) that
            chose t (EC-DLM's `moe_router_activation_function = sigmoid`; also sums to 1).
        z_loss_coef: weight of the router z-loss.
        valid: [B, L] bool; padding (False) is never chosen and the capacities count valid
            tokens only: C_b = min(max(⌊n_b·k_b/E⌋, 1), n_b) for n_b valid tokens (0 if none).

    Returns:
        Dispatch with every expert holding the same number of slots (`equal_counts=True`).
        Tokens no expert chose have no slot: zero routed output.
    """
    logits = check_logits(logits)
    batch, length, num_experts = logits.shape
    k = _check_k(k, batch, num_experts)
    check_choice("pool", pool, POOLS)
    check_choice("select", select, SELECT)
    check_choice("gate", gate, GATES)
    check_float("z_loss_coef", z_loss_coef, low=0.0)
    if valid is not None:
        check_valid(valid, batch, length, device=logits.device)
    return _expert_choice(logits, k, ExpertChoiceRule(pool, select, gate, z_loss_coef), valid=valid)


def _expert_choice(
    logits: Tensor,
    k: int | Tensor,
    rule: ExpertChoiceRule,
    *,
    valid: Tensor | None = None,
    capacity: PoolCapacity | None = None,
    losses: bool = True,
) -> Dispatch:
    """`expert_choice` on checked arguments. `capacity`: this forward's pool capacities when the
    caller computed them (a model, once per forward), else computed here (a host read where k is
    per sample or tokens are padded). `losses=False` leaves the z-loss out (eval)."""
    batch, length, num_experts = logits.shape
    logits = logits.float()
    num_tokens = batch * length
    if capacity is None:
        capacity = pool_capacity(k, batch, length, num_experts, rule.pool, valid, logits.device)
    assert capacity.per_pool.numel() == (batch if rule.pool == "sequence" else 1), "capacities of other pools"

    # 1. each expert ranks the tokens of its pool (padding last: never within capacity); [P, E, pool_len]
    rank_BLE = logits.detach() if rule.select == "logit" else torch.softmax(logits.detach(), dim=-1)
    if valid is not None:
        rank_BLE = rank_BLE.masked_fill(~valid.unsqueeze(-1), float("-inf"))
    pool_len = length if rule.pool == "sequence" else num_tokens
    rank_PEL = rank_BLE.reshape(-1, pool_len, num_experts).transpose(1, 2)  # [P, E, pool_len]
    pos_PEC = rank_PEL.topk(capacity.max, dim=-1, sorted=True).indices

    # 2. expert-major slots: [E, P, C] flattened; drop slots beyond a pool's own capacity
    pool_offset_P = torch.arange(pos_PEC.shape[0], device=logits.device) * pool_len
    token_EPC = (pos_PEC + pool_offset_P[:, None, None]).permute(1, 0, 2)
    if capacity.uniform:
        token_S = token_EPC.reshape(-1)
    else:
        token_S = token_EPC.reshape(num_experts, -1)[:, capacity.kept_slots()].reshape(-1)
    per_expert = capacity.total
    expert_S = torch.arange(num_experts, device=logits.device).unsqueeze(1).expand(-1, per_expert).reshape(-1)

    # 3. gates: softmax over the experts that chose each token (or the full softmax)
    logits_NE = logits.reshape(num_tokens, num_experts)
    gate_S = ec_gates(logits_NE, token_S, expert_S, rule.gate)
    return Dispatch(
        token_index=token_S,
        expert_index=expert_S,
        gate=gate_S,
        counts=torch.full((num_experts,), per_expert, dtype=torch.int64, device=logits.device),
        num_tokens=num_tokens,
        batch_shape=(batch, length),
        num_requested_slots=num_experts * per_expert,
        aux_loss=ec_z_loss(logits_NE, rule.z_loss_coef if losses else 0.0, valid),
        equal_counts=True,
        valid=valid,
    )


class TokenPool(Protocol):
    """The tokens of several processes pooled for expert choice (implemented by `dlmoe.parallel`).

    `rank` is this member's index and `size` the number of members; `gather` concatenates every
    member's tensor along dim 0 in rank order (no gradient)."""

    rank: int
    size: int

    def gather(self, x: Tensor) -> Tensor: ...


def expert_choice_pooled(
    logits: Tensor,
    k: int | Tensor,
    token_pool: TokenPool,
    *,
    select: str = "logit",
    gate: str = "restricted",
    z_loss_coef: float = 0.0,
    valid: Tensor | None = None,
) -> Dispatch:
    """`expert_choice(pool="batch")` over the tokens of every member of `token_pool`.

    Each expert picks its top-C tokens of the concatenated batches (members in rank order), with
    C = min(max(⌊Σ n·k / E⌋, 1), Σ n) summed over all members; this member keeps the slots of its
    own tokens. Equal to one process routing the concatenated batch; the members' slot counts per
    expert differ (`equal_counts=False`), but they add up to C. Gates depend on the local logits only.
    Every member must pass the same [B, L] batch shape.
    """
    logits = check_logits(logits)
    batch, length, num_experts = logits.shape
    k = _check_k(k, batch, num_experts)
    check_choice("select", select, SELECT)
    check_choice("gate", gate, GATES)
    if valid is not None:
        check_valid(valid, batch, length, device=logits.device)
    rule = ExpertChoiceRule("batch", select, gate, z_loss_coef)
    return _expert_choice_pooled(logits, k, token_pool, rule, valid=valid)


def _expert_choice_pooled(
    logits: Tensor,
    k: int | Tensor,
    token_pool: TokenPool,
    rule: ExpertChoiceRule,
    *,
    valid: Tensor | None = None,
    losses: bool = True,
) -> Dispatch:
    """`expert_choice_pooled` on checked arguments (two gathers over the pool: they sync)."""
    batch, length, num_experts = logits.shape
    logits = logits.float()
    num_tokens = batch * length

    # 1. the pool's capacity from the budgets of all members (one gather: budget, valid tokens, shape)
    k_B = torch.as_tensor(k, dtype=torch.int64, device=logits.device).expand(batch)
    n_B = torch.full_like(k_B, length) if valid is None else valid.sum(1).to(k_B.device)
    facts = torch.stack([(n_B * k_B).sum(), n_B.sum(), k_B.new_tensor(batch), k_B.new_tensor(length)])
    facts_M4 = token_pool.gather(facts.unsqueeze(0))  # [members, 4]
    if bool((facts_M4[:, 2:] != facts_M4[:1, 2:]).any()):
        raise ValueError(
            f"a token pool over {token_pool.size} processes needs the same [B, L] on every member, got "
            f"{facts_M4[:, 2:].tolist()} (use parallel.ec_pool='local' for uneven batches)"
        )
    budget, n_total = facts_M4[:, :2].sum(0).tolist()
    capacity = capacity_for_budget(budget, n_total, num_experts)

    # 2. every expert ranks the pooled tokens; keep the picks that are this member's tokens
    rank_NE = logits.detach() if rule.select == "logit" else torch.softmax(logits.detach(), dim=-1)
    rank_NE = rank_NE.reshape(num_tokens, num_experts)
    if valid is not None:
        rank_NE = rank_NE.masked_fill(~valid.reshape(-1, 1), float("-inf"))
    pos_EC = token_pool.gather(rank_NE).T.topk(capacity, dim=-1, sorted=True).indices
    first = token_pool.rank * num_tokens
    mine_EC = (pos_EC >= first) & (pos_EC < first + num_tokens)
    counts_E = mine_EC.sum(1)
    token_S = pos_EC[mine_EC] - first  # row-major over experts: sorted by expert
    num_slots = token_S.numel()
    expert_S = torch.arange(num_experts, device=logits.device).repeat_interleave(counts_E, output_size=num_slots)

    logits_NE = logits.reshape(num_tokens, num_experts)
    return Dispatch(
        token_index=token_S,
        expert_index=expert_S,
        gate=ec_gates(logits_NE, token_S, expert_S, rule.gate),
        counts=counts_E,
        num_tokens=num_tokens,
        batch_shape=(batch, length),
        num_requested_slots=num_slots,
        aux_loss=ec_z_loss(logits_NE, rule.z_loss_coef if losses else 0.0, valid),
        equal_counts=False,
        valid=valid,
    )


def ec_z_loss(logits_NE: Tensor, z_loss_coef: float, valid: Tensor | None) -> Tensor:
    """z_loss_coef · z-loss over the valid tokens (0 when the coefficient is 0 or nothing is valid)."""
    return weighted_z_loss(logits_NE, z_loss_coef, valid)


def ec_gates(logits_NE: Tensor, token_S: Tensor, expert_S: Tensor, gate: str) -> Tensor:
    """[S] gates of the chosen (token, expert) pairs, differentiable w.r.t. the logits.

    "restricted": softmax of l_t over the experts S(t) that chose t; "full": softmax(l_t)_e over
    all E; "restricted_sigmoid": σ(l_{t,e}) / (Σ_{e'∈S(t)} σ(l_{t,e'}) + 1e-20) (EC-DLM's sparse
    sigmoid, its 1e-20 included). Tokens no expert chose have no slot (zero gate).
    """
    if gate == "restricted":
        chosen_NE = torch.zeros_like(logits_NE, dtype=torch.bool)
        chosen_NE[token_S, expert_S] = True
        gates_NE = torch.softmax(logits_NE.masked_fill(~chosen_NE, _MASKED), dim=-1)
    elif gate == "restricted_sigmoid":
        sigmoid_S = torch.sigmoid(logits_NE[token_S, expert_S])
        sum_N = sigmoid_S.new_zeros(logits_NE.shape[0]).index_add(0, token_S, sigmoid_S)
        return sigmoid_S / (sum_N[token_S] + 1e-20)
    else:
        gates_NE = torch.softmax(logits_NE, dim=-1)
    return gates_NE[token_S, expert_S]
