"""dMoE block routing on explicit blocks (`block_ids`, the sampler's decoding blocks) and with padding."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from dlmoe.routing import block_route, unique_experts_per_block
from dlmoe.routing.block import block_layout, block_votes
from tests.routing.helpers import generic_logits
from tests.routing.test_block import reference_coreset_sizes


@st.composite
def id_cases(draw: st.DrawFn) -> dict:
    batch, length, num_experts = draw(st.integers(1, 3)), draw(st.integers(1, 16)), draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 4))
    logits = torch.stack([generic_logits(length, num_experts, seed + b) for b in range(batch)])
    steps = draw(st.lists(st.integers(0, 3), min_size=length, max_size=length))
    valid = None
    if draw(st.booleans()):
        valid = torch.tensor(draw(st.lists(st.booleans(), min_size=batch * length, max_size=batch * length)))
        valid = valid.view(batch, length)
    return {
        "scores": torch.sigmoid(logits) if draw(st.booleans()) else torch.softmax(logits, -1),
        "k": draw(st.integers(1, num_experts)),
        "block_ids": torch.tensor(steps, dtype=torch.int64).cumsum(0) + draw(st.integers(-5, 5)),
        "valid": valid,
        "top_p": draw(st.sampled_from([1.0, 0.9, 0.6, 0.3])),
        "guard": draw(st.integers(1, num_experts)),
    }


def runs(block_ids: torch.Tensor) -> list[list[int]]:
    ids = block_ids.tolist()
    out: list[list[int]] = []
    for pos, i in enumerate(ids):
        if pos and i == ids[pos - 1]:
            out[-1].append(pos)
        else:
            out.append([pos])
    return out


@given(id_cases())
def test_blocks_are_runs_of_equal_ids(case: dict) -> None:
    scores, k, valid = case["scores"], case["k"], case["valid"]
    batch, length, num_experts = scores.shape
    d = block_route(scores, k, block_ids=case["block_ids"], valid=valid, top_p=case["top_p"], guard=case["guard"])
    blocks = runs(case["block_ids"])
    assert d.block_size is None
    assert d.block_index.tolist() == [p for p, positions in enumerate(blocks) for _ in positions]
    assert d.coreset_mask.shape == (batch, len(blocks), num_experts)
    valid_ = valid if valid is not None else torch.ones(batch, length, dtype=torch.bool)
    votes = block_votes(scores, k, block_ids=case["block_ids"], valid=valid)
    routed: dict[int, set[int]] = {}
    for t, e in zip(d.token_index.tolist(), d.expert_index.tolist(), strict=True):
        routed.setdefault(t, set()).add(e)
    for b in range(batch):
        for p, positions in enumerate(blocks):
            ref = [0.0] * num_experts
            for i in positions:
                if valid_[b, i]:
                    for e in scores[b, i].double().topk(k).indices.tolist():
                        ref[e] += float(scores[b, i, e])
            total = sum(ref)
            ref = [x / total if total else 0.0 for x in ref]
            torch.testing.assert_close(votes[b, p].double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5, rtol=0)
            core = [e for e in range(num_experts) if d.coreset_mask[b, p, e]]
            if total:
                assert len(core) in reference_coreset_sizes(ref, case["top_p"], case["guard"])
            for i in positions:
                t = b * length + i
                want = set(sorted(core, key=lambda e, t=t: -float(scores.view(-1, num_experts)[t, e]))[:k])
                assert routed.get(t, set()) == (want if valid_[b, i] else set())
    assert d.num_requested_slots == int(valid_.sum()) * k


@given(st.integers(1, 3), st.integers(1, 20), st.integers(1, 8), st.integers(1, 24), st.integers(0, 2**31 - 4))
def test_default_blocks_equal_explicit_ids(batch: int, length: int, num_experts: int, block_size: int, seed: int):
    scores = torch.softmax(torch.stack([generic_logits(length, num_experts, seed + b) for b in range(batch)]), -1)
    k, guard = min(2, num_experts), min(3, num_experts)
    default = block_route(scores, k, block_size=block_size, top_p=0.6, guard=guard)
    ids = torch.arange(length) // min(block_size, length) - 1  # any offset: only the runs matter
    explicit = block_route(scores, k, block_ids=ids, top_p=0.6, guard=guard)
    assert torch.equal(default.coreset_mask, explicit.coreset_mask)
    assert torch.equal(default.block_index, explicit.block_index)
    assert torch.equal(default.token_index, explicit.token_index)
    assert torch.equal(default.expert_index, explicit.expert_index)
    assert torch.equal(default.gate, explicit.gate)
    assert torch.equal(unique_experts_per_block(default), unique_experts_per_block(explicit))
    assert default.stats() == explicit.stats()


def test_block_layout() -> None:
    block_L, num_blocks = block_layout(7, 3, None, torch.device("cpu"))
    assert block_L.tolist() == [0, 0, 0, 1, 1, 1, 2] and num_blocks == 3
    block_L, num_blocks = block_layout(6, 3, torch.tensor([-2, -2, 0, 0, 0, 9]), torch.device("cpu"))
    assert block_L.tolist() == [0, 0, 1, 1, 1, 2] and num_blocks == 3


def test_padding_casts_no_vote_example() -> None:
    # one block; the pad (position 0) strongly prefers expert 2, the real tokens expert 0
    scores = torch.tensor([[[0.0, 0.0, 1.0], [0.9, 0.05, 0.05], [0.8, 0.15, 0.05]]])
    valid = torch.tensor([[False, True, True]])
    ids = torch.zeros(3, dtype=torch.int64)
    d = block_route(scores, 1, block_ids=ids, valid=valid, top_p=0.7, guard=1)
    assert d.coreset_mask[0, 0].tolist() == [True, False, False]
    assert d.token_index.tolist() == [1, 2] and d.expert_index.tolist() == [0, 0]
    no_pad = block_route(scores, 1, block_ids=ids, top_p=0.7, guard=1)
    assert no_pad.coreset_mask[0, 0].tolist() == [True, False, True]
