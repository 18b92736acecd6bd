"""Padding (`valid`): a row routes exactly the same alone as left-padded inside a batch.

Every router is checked: token choice (dropless), expert choice with a sequence pool (static and
per-row k), dMoE block routing and expert-choice block routing (explicit decoding blocks, shared
by all rows). Pads get large logits, so any leak into selection or votes would show.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dlmoe.routing import block_expert_choice, block_route, expert_choice, token_choice
from tests.routing.helpers import assert_same_slots, distinct_logits, generic_logits, left_pad, row_slots


@st.composite
def padded_cases(draw: st.DrawFn, max_experts: int = 8) -> dict:
    num_experts = draw(st.integers(1, max_experts))
    lengths = draw(st.lists(st.integers(1, 12), min_size=1, max_size=3))
    length = max(lengths) + draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**31 - 4))
    rows = [generic_logits(n, num_experts, seed + b) for b, n in enumerate(lengths)]  # no ties across rows
    logits, valid = left_pad(rows, length, draw(st.integers(0, 2**31 - 1)))
    steps = draw(st.lists(st.integers(0, 1), min_size=length, max_size=length))  # non-decreasing block ids
    block_ids = torch.tensor(steps, dtype=torch.int64).cumsum(0) + draw(st.integers(-3, 3))
    return {"rows": rows, "logits": logits, "valid": valid, "block_ids": block_ids, "num_experts": num_experts}


def row_k(ks: list[int], row: int | None) -> torch.Tensor:
    """Per-row k of the batch (row None) or of one row routed alone."""
    return torch.tensor(ks if row is None else [ks[row]], dtype=torch.int64)


def assert_rows_route_alone(case: dict, route) -> None:
    """route(logits [B, L, E], valid, block_ids, row) → Dispatch; row None = the padded batch."""
    logits, valid, block_ids = case["logits"], case["valid"], case["block_ids"]
    length = logits.shape[1]
    batched = route(logits, valid, block_ids, None)
    pads = (~valid).reshape(-1)
    assert not bool(pads[batched.token_index].any()), "a pad got a slot"
    for b, row in enumerate(case["rows"]):
        shift = length - row.shape[0]
        alone = route(row.unsqueeze(0), None, block_ids[shift:], b)
        assert_same_slots(row_slots(batched, b, shift), row_slots(alone), f"row {b} alone vs padded")


@given(padded_cases(), st.data())
def test_token_choice_padding_invariance(case: dict, data: st.DataObject) -> None:
    num_experts = case["num_experts"]
    k = data.draw(st.integers(1, num_experts))
    score = data.draw(st.sampled_from(["softmax", "sigmoid"]))
    renormalize = data.draw(st.booleans())
    bias = torch.linspace(0.0, 0.1, num_experts) if data.draw(st.booleans()) else None

    def route(logits, valid, block_ids, row):
        return token_choice(logits, k, score=score, renormalize=renormalize, expert_bias=bias, valid=valid)

    assert_rows_route_alone(case, route)


@given(padded_cases(), st.data())
def test_expert_choice_sequence_pool_padding_invariance(case: dict, data: st.DataObject) -> None:
    num_experts, batch = case["num_experts"], len(case["rows"])
    ks = [data.draw(st.integers(1, num_experts)) for _ in range(batch)]
    per_row = data.draw(st.booleans())
    select = data.draw(st.sampled_from(["logit", "score"]))
    gate = data.draw(st.sampled_from(["restricted", "full", "restricted_sigmoid"]))

    def route(logits, valid, block_ids, row):
        k = row_k(ks, row) if per_row else ks[0]
        return expert_choice(logits, k, pool="sequence", select=select, gate=gate, valid=valid)

    assert_rows_route_alone(case, route)


@given(padded_cases(), st.data())
def test_block_route_padding_invariance(case: dict, data: st.DataObject) -> None:
    num_experts = case["num_experts"]
    k = data.draw(st.integers(1, num_experts))
    guard = data.draw(st.integers(1, num_experts))
    top_p = data.draw(st.sampled_from([1.0, 0.9, 0.6, 0.3]))
    score = data.draw(st.sampled_from(["softmax", "sigmoid"]))

    def route(logits, valid, block_ids, row):
        scores = torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)
        return block_route(scores, k, block_ids=block_ids, valid=valid, top_p=top_p, guard=guard)

    assert_rows_route_alone(case, route)


@given(padded_cases(), st.data())
def test_block_expert_choice_padding_invariance(case: dict, data: st.DataObject) -> None:
    num_experts, batch = case["num_experts"], len(case["rows"])
    ks = [data.draw(st.integers(1, num_experts)) for _ in range(batch)]
    per_row = data.draw(st.booleans())
    guard = data.draw(st.integers(1, num_experts))
    top_p = data.draw(st.sampled_from([1.0, 0.9, 0.6, 0.3]))
    select = data.draw(st.sampled_from(["logit", "score"]))
    gate = data.draw(st.sampled_from(["restricted", "full", "restricted_sigmoid"]))

    def route(logits, valid, block_ids, row):
        k = row_k(ks, row) if per_row else ks[0]
        return block_expert_choice(
            logits, k, block_ids=block_ids, valid=valid, top_p=top_p, guard=guard, select=select, gate=gate
        )

    assert_rows_route_alone(case, route)


# ---------------------------------------------------------------------------------------------
# what padding does not count toward: capacity, losses, expert-bias counts


def packed(logits: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The valid tokens as one sequence [1, n, E], and the flat index each came from."""
    return logits[valid].unsqueeze(0), valid.reshape(-1).nonzero().squeeze(1).tolist()


def mapped(d, index: list[int]) -> dict[tuple[int, int], float]:
    """Slots of a dispatch of packed tokens, keyed by the flat index the tokens came from."""
    return {(index[t], e): g for (t, e), g in row_slots(d).items()}


def all_slots(d) -> dict[tuple[int, int], float]:
    return {(t, e): g for t, e, g in zip(d.token_index.tolist(), d.expert_index.tolist(), d.gate.tolist(), strict=True)}


@given(padded_cases(), st.data())
def test_token_choice_capacity_losses_and_counts_see_valid_tokens_only(case: dict, data: st.DataObject) -> None:
    logits, valid, num_experts = case["logits"], case["valid"], case["num_experts"]
    k = data.draw(st.integers(1, num_experts))
    cf = data.draw(st.sampled_from([0.5, 1.0, 1.5]))
    score = data.draw(st.sampled_from(["softmax", "sigmoid"]))
    kw = dict(score=score, capacity_factor=cf, aux_loss_coef=0.7, z_loss_coef=0.3)
    d = token_choice(logits, k, valid=valid, **kw)
    flat, index = packed(logits, valid)
    ref = token_choice(flat, k, **kw)
    num_valid = int(valid.sum())
    assert int(d.counts.max()) <= math.ceil(num_valid * k / num_experts * cf)
    assert_same_slots(all_slots(d), mapped(ref, index))
    assert torch.equal(d.requested_counts, ref.requested_counts)
    assert int(d.requested_counts.sum()) == num_valid * k
    assert d.num_requested_slots == num_valid * k
    torch.testing.assert_close(d.aux_loss, ref.aux_loss, rtol=1e-5, atol=1e-6)


@given(padded_cases(), st.data())
def test_expert_choice_batch_pool_capacity_counts_valid_tokens(case: dict, data: st.DataObject) -> None:
    logits, valid, num_experts = case["logits"], case["valid"], case["num_experts"]
    batch = logits.shape[0]
    k = torch.tensor([data.draw(st.integers(1, num_experts)) for _ in range(batch)], dtype=torch.int64)
    d = expert_choice(logits, k, pool="batch", valid=valid, z_loss_coef=0.5)
    n_b = valid.sum(1)
    cap = min(max(int((n_b * k).sum()) // num_experts, 1), int(n_b.sum()))
    assert torch.equal(d.counts, torch.full((num_experts,), cap, dtype=torch.int64))
    assert not bool((~valid).reshape(-1)[d.token_index].any())
    ref_z = 0.5 * torch.logsumexp(logits[valid].double(), -1).square().mean()
    assert float(d.aux_loss) == pytest.approx(float(ref_z), rel=1e-5, abs=1e-6)
    if bool((k == k[0]).all()):  # one pool of the valid tokens: the same as those tokens packed
        flat, index = packed(logits, valid)
        assert_same_slots(all_slots(d), mapped(expert_choice(flat, int(k[0]), pool="batch"), index))


@given(padded_cases(), st.data())
def test_expert_choice_sequence_capacity_from_valid_count(case: dict, data: st.DataObject) -> None:
    logits, valid, num_experts = case["logits"], case["valid"], case["num_experts"]
    batch, length, _ = logits.shape
    k = torch.tensor([data.draw(st.integers(1, num_experts)) for _ in range(batch)], dtype=torch.int64)
    d = expert_choice(logits, k, valid=valid)
    rows = (d.token_index // length).tolist()
    for b in range(batch):
        n = int(valid[b].sum())
        cap = min(max(n * int(k[b]) // num_experts, 1), n)
        for e in range(num_experts):
            got = sum(1 for r, x in zip(rows, d.expert_index.tolist(), strict=True) if r == b and x == e)
            assert got == cap


def test_all_padding_routes_nothing() -> None:
    logits = distinct_logits(2, 5, 4, seed=3)
    valid = torch.zeros(2, 5, dtype=torch.bool)
    block_ids = torch.zeros(5, dtype=torch.int64)
    dispatches = [
        token_choice(logits, 2, valid=valid, capacity_factor=1.0, aux_loss_coef=1.0, z_loss_coef=1.0),
        expert_choice(logits, 2, valid=valid, z_loss_coef=1.0),
        expert_choice(logits, 2, pool="batch", valid=valid),
        block_route(torch.softmax(logits, -1), 2, block_ids=block_ids, valid=valid, guard=2),
        block_expert_choice(logits, 2, block_ids=block_ids, valid=valid, guard=2, z_loss_coef=1.0),
    ]
    for d in dispatches:
        assert d.num_slots == 0
        assert int(d.counts.sum()) == 0
        assert float(d.aux_loss) == 0.0
        stats = d.stats()
        assert stats.experts_per_token_mean == 0.0


def test_padding_gets_zero_combine_output() -> None:
    logits, valid = left_pad([distinct_logits(1, 3, 4, seed=1)[0], distinct_logits(1, 6, 4, seed=2)[0]], 6, seed=0)
    for d in (token_choice(logits, 2, valid=valid), expert_choice(logits, 2, valid=valid)):
        out = d.combine(torch.ones(d.num_slots, 2)).view(2, 6, 2)
        assert torch.equal(out[~valid], torch.zeros(int((~valid).sum()), 2))
        assert d.stats().zero_expert_fraction == pytest.approx(
            float((d.experts_per_token().view(2, 6)[valid] == 0).float().mean())
        )
