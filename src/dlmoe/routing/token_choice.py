"""Token-choice (TC) top-k routing: each token picks its k experts.

Covers the variants the EC-DLM and dMoE papers compare against or build on: softmax or sigmoid
scores, optional renormalisation, capacity factor with the "probs" drop policy (or dropless),
Switch aux loss, z-loss, loss-free expert bias (selection only), DeepSeek-V3/LLaDA2
group-limited top-k and a routed scaling factor.

Letters: B batch, L length, N = B·L tokens, E experts, K top-k, G groups, S slots.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from dlmoe._checks import check_choice, check_float, check_int, check_tensor
from dlmoe.routing.context import check_valid
from dlmoe.routing.dispatch import Dispatch, expert_counts, sorted_dispatch_from_topk
from dlmoe.vocab import SCORE_FUNCTIONS


def router_scores(logits: Tensor, score: str) -> Tensor:
    """Routing scores in fp32: softmax over experts or elementwise sigmoid."""
    check_choice("score", score, SCORE_FUNCTIONS)
    return _scores(logits, score)


def _scores(logits: Tensor, score: str) -> Tensor:
    logits = logits.float()
    return torch.softmax(logits, dim=-1) if score == "softmax" else torch.sigmoid(logits)


def z_loss(logits_NE: Tensor) -> Tensor:
    """mean_t (logsumexp_e l_{t,e})² (ST-MoE); keeps router logits small."""
    return torch.logsumexp(logits_NE.float(), dim=-1).square().mean()


def switch_aux_loss(probs_NE: Tensor, tokens_per_expert_E: Tensor, k: int) -> Tensor:
    """Switch load-balancing loss E/(N²·k) · Σ_e (Σ_t p_{t,e}) · n_e (Switch eq. 4–6, Megatron form).

    `probs_NE` are per-token probabilities over all experts (rows sum to 1); `tokens_per_expert_E`
    counts routed slots per expert before any capacity drop. Equals 1 at perfect balance.
    """
    num_tokens, num_experts = probs_NE.shape
    scale = num_experts / (num_tokens * num_tokens * k)
    return scale * (probs_NE.sum(0) * tokens_per_expert_E.to(probs_NE.dtype)).sum()


def group_limited_mask(choice_NE: Tensor, n_group: int, topk_group: int) -> Tensor:
    """[N, E] bool: experts inside each token's `topk_group` best groups (DeepSeek-V3).

    A group's score is the sum of its two best (biased) expert scores. Experts already excluded
    (-inf) do not count: groups are ranked first by how many of their two best are allowed, then
    by the sum of those — with no exclusions this is exactly DeepSeek-V3's ranking.
    """
    num_tokens, num_experts = choice_NE.shape
    grouped_NGX = choice_NE.view(num_tokens, n_group, num_experts // n_group)
    best = min(2, num_experts // n_group)
    top_NGB = grouped_NGX.topk(best, dim=-1).values
    finite_NGB = torch.isfinite(top_NGB)
    top_sum_NG = torch.where(finite_NGB, top_NGB, 0.0).sum(-1)
    # float64 two-level key: count dominates, the float32 sum breaks ties exactly
    group_score_NG = finite_NGB.sum(-1).double() * 1e6 + top_sum_NG.double()
    keep_group_NG = torch.zeros_like(group_score_NG, dtype=torch.bool)
    keep_group_NG.scatter_(1, group_score_NG.topk(topk_group, dim=-1).indices, True)
    return keep_group_NG.unsqueeze(-1).expand_as(grouped_NGX).reshape(num_tokens, num_experts)


def _check_tc_args(
    num_experts: int,
    k: int,
    capacity_factor: float | None,
    expert_bias: Tensor | None,
    n_group: int | None,
    topk_group: int | None,
    routed_scaling_factor: float,
) -> None:
    check_int("k", k, low=1, high=num_experts)
    if capacity_factor is not None:
        check_float("capacity_factor", capacity_factor, low=0.0, low_open=True)
    if expert_bias is not None:
        check_tensor("expert_bias", expert_bias, shape=(num_experts,), floating=True)
    if (n_group is None) != (topk_group is None):
        raise ValueError(f"n_group and topk_group go together, got n_group={n_group}, topk_group={topk_group}")
    if n_group is not None:
        check_int("n_group", n_group, low=1, high=num_experts)
        if num_experts % n_group:
            raise ValueError(f"n_group must divide num_experts={num_experts}, got n_group={n_group}")
        check_int("topk_group", topk_group, low=1, high=n_group)
        if topk_group * (num_experts // n_group) < k:
            raise ValueError(
                f"topk_group={topk_group} groups of {num_experts // n_group} experts hold fewer than k={k}"
            )
    check_float("routed_scaling_factor", routed_scaling_factor, low=0.0, low_open=True)


def check_logits(logits: object, name: str = "logits") -> Tensor:
    """Router logits must be a float [B, L, E] tensor with E ≥ 1 and B·L ≥ 1."""
    logits = check_tensor(name, logits, ndim=3, floating=True)
    if logits.shape[-1] < 1 or logits.shape[0] * logits.shape[1] < 1:
        raise ValueError(f"{name} must have B·L ≥ 1 tokens and E ≥ 1 experts, got shape {tuple(logits.shape)}")
    return logits


@dataclass(frozen=True)
class TopKRule:
    """How each token picks and weights its k experts: the part of `TokenChoiceConfig` the
    functional router reads (a router builds it once, `rule_of(TopKRule, config)`)."""

    k: int
    score: str = "softmax"
    renormalize: bool = True
    capacity_factor: float | None = None
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    bias_in_gate: bool = False
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0


def token_choice(
    logits: Tensor,
    k: int,
    *,
    score: str = "softmax",
    renormalize: bool = True,
    capacity_factor: float | None = None,
    expert_bias: Tensor | None = None,
    n_group: int | None = None,
    topk_group: int | None = None,
    routed_scaling_factor: float = 1.0,
    aux_loss_coef: float = 0.0,
    z_loss_coef: float = 0.0,
    valid: Tensor | None = None,
    bias_in_gate: bool = False,
) -> Dispatch:
    """Token-choice top-k routing on router logits.

    Args:
        logits: [B, L, E] float router logits (computed in fp32 by the router modules).
        k: experts per token, 1 ≤ k ≤ E.
        score: "softmax" or "sigmoid" scores s = f(logits).
        renormalize: gates of a token's chosen experts are rescaled to sum to 1.
        capacity_factor: None is dropless; else each expert keeps at most C = ceil(N·k/E · cf)
            slots, the ones with the largest gates ("probs" drop policy; survivors' gates are
            not renormalised).
        expert_bias: [E] loss-free balancing bias added to the scores for *selection only*.
        n_group, topk_group: group-limited top-k (tokens pick experts from their best groups).
        routed_scaling_factor: multiplies the gates (LLaDA2 / DeepSeek-V3 use 2.5).
        aux_loss_coef, z_loss_coef: weights of the Switch aux loss and the router z-loss.
        valid: [B, L] bool; padding (False) gets no slot and is left out of the capacity (N counts
            valid tokens), the losses and `requested_counts`.
        bias_in_gate: the gates come from the biased scores s + b (LLaDA-MoE adds its expert bias
            to the softmax probabilities in place, so the bias reaches the combine weights).

    Returns:
        Dispatch with slots sorted by expert; `aux_loss` holds the weighted router losses.
    """
    logits = check_logits(logits)
    batch, length, num_experts = logits.shape
    _check_tc_args(num_experts, k, capacity_factor, expert_bias, n_group, topk_group, routed_scaling_factor)
    check_choice("score", score, SCORE_FUNCTIONS)
    check_float("aux_loss_coef", aux_loss_coef, low=0.0)
    check_float("z_loss_coef", z_loss_coef, low=0.0)
    if valid is not None:
        check_valid(valid, batch, length, device=logits.device)
    rule = TopKRule(
        k, score, renormalize, capacity_factor, n_group, topk_group, routed_scaling_factor, bias_in_gate,
        aux_loss_coef, z_loss_coef,
    )  # fmt: skip
    return _token_choice(logits, rule, expert_bias=expert_bias, valid=valid)


def _token_choice(
    logits: Tensor,
    rule: TopKRule,
    *,
    expert_bias: Tensor | None = None,
    valid: Tensor | None = None,
    losses: bool = True,
    num_valid: int | None = None,
) -> Dispatch:
    """`token_choice` on checked arguments. `losses=False` leaves the router losses out (eval);
    `num_valid`: the valid tokens' count when the caller knows it (else read from `valid`, a sync)."""
    batch, length, num_experts = logits.shape
    k = rule.k
    assert 1 <= k <= num_experts, f"the router's rule has k={k} for {num_experts} experts"
    logits_NE = logits.reshape(-1, num_experts).float()
    num_tokens = logits_NE.shape[0]
    valid_N = None if valid is None else valid.reshape(-1)
    num_routed = num_tokens if valid_N is None else num_valid if num_valid is not None else int(valid_N.sum())

    # 1. scores; experts picked on the (possibly biased, group-limited) scores
    scores_NE = _scores(logits_NE, rule.score)
    expert_NK, _ = route_topk_scores(
        scores_NE, k, expert_bias=expert_bias, n_group=rule.n_group, topk_group=rule.topk_group
    )

    # 2. gates from the unbiased scores (biased: LLaDA-MoE)
    gate_NK = scaled_gates(scores_NE, expert_NK, rule, expert_bias)

    # 3. router losses over the routed tokens, from counts before any drop
    keep_NK = None if valid_N is None else valid_N.unsqueeze(1).expand_as(expert_NK)
    tokens_per_expert = expert_counts(expert_NK, num_experts, keep_NK)
    aux = logits_NE.new_zeros(())
    aux_loss_coef, z_loss_coef = (rule.aux_loss_coef, rule.z_loss_coef) if losses else (0.0, 0.0)
    if num_routed > 0 and aux_loss_coef > 0:
        probs_NE = scores_NE if valid_N is None else scores_NE[valid_N]
        probs_NE = probs_NE if rule.score == "softmax" else probs_NE / probs_NE.sum(-1, keepdim=True)
        aux = aux + aux_loss_coef * switch_aux_loss(probs_NE, tokens_per_expert, k)
    aux = aux + weighted_z_loss(logits_NE, z_loss_coef, valid, num_routed)

    # 4. slots sorted by expert, with capacity dropping; padding takes no slot and no capacity
    num_slots = num_routed * k
    if rule.capacity_factor is not None:
        capacity = math.ceil(num_routed * k / num_experts * rule.capacity_factor)
        rank_NK = gate_NK.detach() if keep_NK is None else gate_NK.detach().masked_fill(~keep_NK, float("-inf"))
        fits_NK = _keep_top_capacity(expert_NK, rank_NK, num_experts, capacity)
        keep_NK = fits_NK if keep_NK is None else fits_NK & keep_NK
        num_slots = None  # how many fit is read back from the device
    token_S, expert_S, gate_S, counts = sorted_dispatch_from_topk(
        expert_NK, gate_NK, num_experts, valid_NK=keep_NK, num_slots=num_slots
    )
    return Dispatch(
        token_index=token_S,
        expert_index=expert_S,
        gate=gate_S,
        counts=counts,
        num_tokens=num_tokens,
        batch_shape=(batch, length),
        num_requested_slots=num_routed * k,
        aux_loss=aux,
        equal_counts=False,
        requested_counts=tokens_per_expert,
        valid=valid,
    )


def scaled_gates(
    scores_NE: Tensor, expert_NK: Tensor, rule: TopKRule, expert_bias: Tensor | None, pick_NK: Tensor | None = None
) -> Tensor:
    """[N, K] gates of the chosen experts: (biased with `bias_in_gate`) scores, renormalised, scaled;
    `pick_NK` False zeroes a pick before the renormalisation (block routing: outside the coreset)."""
    gate_NK = gate_scores(scores_NE, expert_bias, rule.bias_in_gate).gather(1, expert_NK)
    if pick_NK is not None:
        gate_NK = gate_NK * pick_NK
    if rule.renormalize:
        gate_NK = gate_NK / (gate_NK.sum(-1, keepdim=True) + 1e-20)
    if rule.routed_scaling_factor != 1.0:
        gate_NK = gate_NK * rule.routed_scaling_factor
    return gate_NK


def weighted_z_loss(
    logits_NE: Tensor, z_loss_coef: float, valid: Tensor | None, num_routed: int | None = None
) -> Tensor:
    """z_loss_coef · z-loss over the valid tokens (0 when the coefficient is 0 or nothing is valid);
    `num_routed`: the valid tokens' count when known (skips a read of `valid`)."""
    aux = logits_NE.new_zeros(())
    if z_loss_coef > 0 and num_routed != 0:
        routed_NE = logits_NE if valid is None else logits_NE[valid.reshape(-1)]
        if routed_NE.shape[0] > 0:
            aux = aux + z_loss_coef * z_loss(routed_NE)
    return aux


def gate_scores(scores_NE: Tensor, expert_bias: Tensor | None, bias_in_gate: bool) -> Tensor:
    """The scores gates are read from: s, or s + b with `bias_in_gate` (LLaDA-MoE). Shared with block routing."""
    return scores_NE + expert_bias.float() if bias_in_gate and expert_bias is not None else scores_NE


def _keep_top_capacity(expert_NK: Tensor, gate_NK: Tensor, num_experts: int, capacity: int) -> Tensor:
    """[N, K] bool: slots that survive when each expert keeps its `capacity` largest gates."""
    expert_S = expert_NK.reshape(-1)
    by_gate = torch.argsort(gate_NK.reshape(-1), descending=True, stable=True)
    order = by_gate[torch.argsort(expert_S[by_gate], stable=True)]  # expert asc, gate desc
    counts = expert_counts(expert_S, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(expert_S.numel(), device=expert_S.device) - starts[expert_S[order]]
    keep_S = torch.empty_like(expert_S, dtype=torch.bool)
    keep_S[order] = rank_in_expert < capacity
    return keep_S.view_as(expert_NK)


def route_topk_scores(
    scores_NE: Tensor,
    k: int,
    *,
    expert_bias: Tensor | None,
    n_group: int | None,
    topk_group: int | None,
    allowed_NE: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Top-k expert choice of each token on (biased) scores, optionally restricted to `allowed_NE`.

    Returns (expert_NK, valid_NK); a pick is invalid when fewer than k experts were allowed.
    Shared by token choice and block routing.
    """
    choice_NE = scores_NE.detach()
    if expert_bias is not None:
        choice_NE = choice_NE + expert_bias.float()
    if allowed_NE is not None:
        choice_NE = choice_NE.masked_fill(~allowed_NE, float("-inf"))
    if n_group is not None:
        # groups holding more allowed experts win (see group_limited_mask), so a token keeps
        # k candidates whenever its coreset allows it
        in_group_NE = group_limited_mask(choice_NE, n_group, topk_group)  # type: ignore[arg-type]
        choice_NE = choice_NE.masked_fill(~in_group_NE, float("-inf"))
    values_NK, expert_NK = choice_NE.topk(k, dim=-1)
    return expert_NK, torch.isfinite(values_NK)


__all__ = [
    "SCORE_FUNCTIONS",
    "TopKRule",
    "group_limited_mask",
    "route_topk_scores",
    "router_scores",
    "switch_aux_loss",
    "token_choice",
    "weighted_z_loss",
    "z_loss",
]
