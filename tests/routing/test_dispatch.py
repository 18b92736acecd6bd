"""Dispatch statistics helpers against brute-force Python references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dlmoe.routing import block_expert_choice, block_route, expert_choice, token_choice, unique_experts_per_block
from tests.routing.helpers import generic_logits


@st.composite
def dispatches(draw: st.DrawFn) -> tuple:
    batch, length, num_experts = draw(st.integers(1, 3)), draw(st.integers(1, 12)), draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 4))
    logits = torch.stack([generic_logits(length, num_experts, seed + b) for b in range(batch)])
    valid = None
    if draw(st.booleans()):
        valid = torch.tensor(draw(st.lists(st.booleans(), min_size=batch * length, max_size=batch * length)))
        valid = valid.view(batch, length)
    k = draw(st.integers(1, num_experts))
    ids = torch.tensor(draw(st.lists(st.integers(0, 1), min_size=length, max_size=length))).cumsum(0)
    kind = draw(st.sampled_from(["tc", "ec", "block", "block_ec"]))
    if kind == "tc":
        d = token_choice(logits, k, valid=valid)
    elif kind == "ec":
        d = expert_choice(logits, k, valid=valid)
    elif kind == "block":
        d = block_route(torch.softmax(logits, -1), k, block_ids=ids, valid=valid, guard=1, top_p=0.5)
    else:
        d = block_expert_choice(logits, k, block_ids=ids, valid=valid, guard=1, top_p=0.5)
    mask = torch.tensor(draw(st.lists(st.booleans(), min_size=batch * length, max_size=batch * length)))
    return d, mask.view(batch, length)


def slot_list(d) -> list[tuple[int, int]]:
    return list(zip(d.token_index.tolist(), d.expert_index.tolist(), strict=True))


@given(dispatches())
def test_unique_experts_and_slots_per_row(case: tuple) -> None:
    d, mask = case
    batch, length = d.batch_shape
    want_unique = [len({e for t, e in slot_list(d) if t // length == b and mask[b, t % length]}) for b in range(batch)]
    want_slots = [sum(1 for t, _ in slot_list(d) if t // length == b) for b in range(batch)]
    got = d.unique_experts(mask)
    assert got.dtype == torch.int64 and got.tolist() == want_unique
    assert d.slots_per_row().tolist() == want_slots
    assert d.unique_experts(torch.zeros(batch, length, dtype=torch.bool)).tolist() == [0] * batch


def reference_per_block(d, block_of: list[int], num_blocks: int) -> list[list[int]]:
    """Distinct experts of the slots of each (row, block), block_of[position] naming the block."""
    batch, length = d.batch_shape
    used = [[set() for _ in range(num_blocks)] for _ in range(batch)]
    for t, e in slot_list(d):
        used[t // length][block_of[t % length]].add(e)
    return [[len(s) for s in row] for row in used]


@given(dispatches())
def test_unique_experts_per_block_uses_the_dispatch_blocks(case: tuple) -> None:
    d, _ = case
    batch, length = d.batch_shape
    # an explicit block_size means runs of that many positions, whatever the dispatch
    by_two = reference_per_block(d, [i // 2 for i in range(length)], -(-length // 2))
    assert unique_experts_per_block(d, 2).tolist() == by_two
    if d.block_index is None:
        with pytest.raises(ValueError, match="block_size"):
            unique_experts_per_block(d)
        return
    block_of, num_blocks = d.block_index.tolist(), d.coreset_mask.shape[1]
    want = reference_per_block(d, block_of, num_blocks)
    assert unique_experts_per_block(d).tolist() == want
    # the stats average over the (row, block) pairs that hold a routed token
    valid = d.valid if d.valid is not None else torch.ones(batch, length, dtype=torch.bool)
    routed = {(b, block_of[i]) for b in range(batch) for i in range(length) if valid[b, i]}
    mean = sum(want[b][p] for b, p in routed) / len(routed) if routed else 0.0
    assert d.stats().unique_experts_per_block == pytest.approx(mean)


@given(dispatches())
def test_stats_count_routed_tokens_only(case: tuple) -> None:
    d, _ = case
    batch, length = d.batch_shape
    per_token = d.experts_per_token().view(batch, length)
    routed = per_token[d.valid] if d.valid is not None else per_token.reshape(-1)
    stats = d.stats()
    if routed.numel():
        assert stats.zero_expert_fraction == pytest.approx(float((routed == 0).float().mean()))
        assert stats.experts_per_token_mean == pytest.approx(float(routed.float().mean()))
        assert stats.experts_per_token_max == float(routed.max())


def test_unique_experts_bad_mask() -> None:
    d = token_choice(torch.randn(2, 3, 4), 2)
    with pytest.raises(ValueError, match=r"token_mask.*\(2, 3\)"):
        d.unique_experts(torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"token_mask.*int64"):
        d.unique_experts(torch.ones(2, 3, dtype=torch.int64))
