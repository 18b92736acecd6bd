"""Expert-choice (EC) routing: each expert picks its top-C tokens (Zhou et al. 2022; EC-DLM).

Bidirectional diffusion LMs see the whole sequence at once, so an expert can choose among the
tokens of a sequence without leaking the future — the reason EC suits DLMs. Every expert gets
exactly C tokens (perfect balance, no drops); a token may get 0..E experts.

Per-sample capacity: with k given per sequence (from the mask ratio, see `schedules`),
C_b = max(⌊L·k_b/E⌋, 1). The batch runs one top-k with max_b C_b and keeps slots j < C_b;
every expert still holds Σ_b C_b slots, so the expert compute stays a dense bmm.

Letters: B batch, L length, N = B·L tokens, E experts, C capacity, S slots.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlmoe._checks import check_choice, check_float, check_int, check_tensor
from dlmoe.routing.dispatch import Dispatch
from dlmoe.routing.token_choice import check_logits, z_loss

POOLS = ("sequence", "batch")
SELECT = ("logit", "score")
GATES = ("restricted", "full")
_MASKED = -1e30  # finite "minus infinity": keeps softmax rows with no chosen expert NaN-free


def _check_k(k: int | Tensor, batch: int, num_experts: int) -> int | Tensor:
    if isinstance(k, Tensor):
        check_tensor("k", k, shape=(batch,), floating=False)
        if bool(((k < 1) | (k > num_experts)).any()):
            raise ValueError(f"k must lie in [1, {num_experts}] for every sample, got {k.tolist()}")
        return k
    return check_int("k", k, low=1, high=num_experts)


def ec_capacities(k: int | Tensor, batch: int, length: int, num_experts: int, pool: str) -> tuple[Tensor, int]:
    """Capacity of each pool and the largest one.

    Returns (capacity_P int64, max capacity) with P = B pools for "sequence" and P = 1 for "batch".
    """
    k_B = torch.as_tensor(k, dtype=torch.int64).expand(batch) if not isinstance(k, Tensor) else k.long()
    if pool == "sequence":
        cap = torch.clamp(length * k_B // num_experts, min=1)
    else:  # one pool of all N tokens; per-sample k adds up to the pool's budget
        cap = torch.clamp(length * k_B.sum(0, keepdim=True) // num_experts, min=1)
    return cap, int(cap.max())


def expert_choice(
    logits: Tensor,
    k: int | Tensor,
    *,
    pool: str = "sequence",
    select: str = "logit",
    gate: str = "restricted",
    z_loss_coef: float = 0.0,
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
            token's gates sum to 1); "full" = the full softmax score softmax(l_t)_e (Zhou et al.).
        z_loss_coef: weight of the router z-loss.

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
    logits = logits.float()
    num_tokens = batch * length

    # 1. each expert ranks the tokens of its pool; pools are rows of rank_PEL
    rank_BLE = logits.detach() if select == "logit" else torch.softmax(logits.detach(), dim=-1)
    pool_len = length if pool == "sequence" else num_tokens
    rank_PEL = rank_BLE.reshape(-1, pool_len, num_experts).transpose(1, 2)  # [P, E, pool_len]
    capacity_P, max_cap = ec_capacities(k, batch, length, num_experts, pool)
    max_cap = min(max_cap, pool_len)
    pos_PEC = rank_PEL.topk(max_cap, dim=-1, sorted=True).indices

    # 2. expert-major slots: [E, P, C] flattened; drop slots beyond a pool's own capacity
    pool_offset_P = torch.arange(pos_PEC.shape[0], device=logits.device) * pool_len
    token_EPC = (pos_PEC + pool_offset_P[:, None, None]).permute(1, 0, 2)
    if bool((capacity_P.clamp(max=pool_len) == max_cap).all()):
        token_S = token_EPC.reshape(-1)
        per_expert = pos_PEC.shape[0] * max_cap
    else:
        keep_PC = torch.arange(max_cap, device=logits.device) < capacity_P.clamp(max=pool_len)[:, None]
        token_S = token_EPC[keep_PC.unsqueeze(0).expand_as(token_EPC)]
        per_expert = int(keep_PC.sum())
    expert_S = torch.arange(num_experts, device=logits.device).repeat_interleave(per_expert)

    # 3. gates: softmax over the experts that chose each token (or the full softmax)
    logits_NE = logits.reshape(num_tokens, num_experts)
    if gate == "restricted":
        chosen_NE = torch.zeros_like(logits_NE, dtype=torch.bool)
        chosen_NE[token_S, expert_S] = True
        gates_NE = torch.softmax(logits_NE.masked_fill(~chosen_NE, _MASKED), dim=-1)
    else:
        gates_NE = torch.softmax(logits_NE, dim=-1)
    gate_S = gates_NE[token_S, expert_S]

    aux = logits.new_zeros(())
    if z_loss_coef > 0:
        aux = aux + z_loss_coef * z_loss(logits_NE)
    return Dispatch(
        token_index=token_S,
        expert_index=expert_S,
        gate=gate_S,
        counts=torch.full((num_experts,), per_expert, dtype=torch.int64, device=logits.device),
        num_tokens=num_tokens,
        batch_shape=(batch, length),
        num_requested_slots=num_experts * per_expert,
        aux_loss=aux,
        equal_counts=True,
    )
