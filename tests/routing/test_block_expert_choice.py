"""Expert-choice block routing: coreset per block, EC inside it, against a brute-force reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dlmoe.routing import block_expert_choice, expert_choice, unique_experts_per_block
from tests.routing.helpers import assert_same_slots, generic_logits, row_slots
from tests.routing.test_block import reference_coreset_sizes


@st.composite
def bec_cases(draw: st.DrawFn) -> dict:
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 16))
    num_experts = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 4))
    logits = torch.stack([generic_logits(length, num_experts, seed + b) for b in range(batch)])
    ks = [draw(st.integers(1, num_experts)) for _ in range(batch)]
    k = torch.tensor(ks, dtype=torch.int64) if draw(st.booleans()) else ks[0]
    valid = None
    if draw(st.booleans()):  # padding anywhere, not only on the left
        valid = torch.tensor(draw(st.lists(st.booleans(), min_size=batch * length, max_size=batch * length)))
        valid = valid.view(batch, length)
    block_ids = None
    if draw(st.booleans()):
        steps = draw(st.lists(st.integers(0, 2), min_size=length, max_size=length))
        block_ids = torch.tensor(steps, dtype=torch.int64).cumsum(0) - 2
    return {
        "logits": logits,
        "k": k,
        "valid": valid,
        "block_ids": block_ids,
        "block_size": draw(st.integers(1, length + 2)),
        "top_p": draw(st.sampled_from([1.0, 0.9, 0.6, 0.3, 0.05])),
        "guard": draw(st.integers(1, num_experts)),
        "select": draw(st.sampled_from(["logit", "score"])),
        "gate": draw(st.sampled_from(["restricted", "full", "restricted_sigmoid"])),
    }


def run(case: dict):
    keys = ("block_size", "block_ids", "valid", "top_p", "guard", "select", "gate")
    return block_expert_choice(case["logits"], case["k"], **{key: case[key] for key in keys})


def blocks_of(case: dict) -> list[list[int]]:
    """Positions of each block: runs of equal ids, else runs of min(block_size, L) positions."""
    length = case["logits"].shape[1]
    if case["block_ids"] is None:
        size = min(case["block_size"], length)
        return [list(range(s, min(s + size, length))) for s in range(0, length, size)]
    ids = case["block_ids"].tolist()
    runs: list[list[int]] = []
    for pos, i in enumerate(ids):
        if pos and i == ids[pos - 1]:
            runs[-1].append(pos)
        else:
            runs.append([pos])
    return runs


def reference(case: dict, coreset_mask: torch.Tensor) -> tuple[list[list[list[float]]], dict[tuple[int, int], float]]:
    """Brute force: votes per (row, block), and the slots {(token, expert): gate} given the coreset."""
    logits = case["logits"].double()
    batch, length, num_experts = logits.shape
    ks = case["k"].tolist() if isinstance(case["k"], torch.Tensor) else [case["k"]] * batch
    valid = case["valid"] if case["valid"] is not None else torch.ones(batch, length, dtype=torch.bool)
    probs = torch.softmax(logits, -1)
    rank = logits if case["select"] == "logit" else probs
    votes, chosen = [], {}
    for b in range(batch):
        row_votes = []
        for p, positions in enumerate(blocks_of(case)):
            toks = [i for i in positions if valid[b, i]]
            v = [0.0] * num_experts
            for i in toks:
                for e in probs[b, i].topk(ks[b]).indices.tolist():
                    v[e] += float(probs[b, i, e])
            total = sum(v)
            row_votes.append([x / total if total else 0.0 for x in v])
            core = [e for e in range(num_experts) if coreset_mask[b, p, e]]
            cap = min(max(len(toks) * ks[b] // len(core), 1), len(toks)) if toks else 0
            for e in core:
                for i in sorted(toks, key=lambda i, e=e: -float(rank[b, i, e]))[:cap]:
                    chosen.setdefault(b * length + i, []).append(e)
        votes.append(row_votes)
    flat = logits.reshape(-1, num_experts)
    slots = {}
    for t, experts in chosen.items():
        if case["gate"] == "restricted":
            gates = torch.softmax(flat[t, experts], 0)
        elif case["gate"] == "restricted_sigmoid":
            gates = torch.sigmoid(flat[t, experts]) / torch.sigmoid(flat[t, experts]).sum()
        else:
            gates = torch.softmax(flat[t], 0)[experts]
        slots |= {(t, e): float(g) for e, g in zip(experts, gates.tolist(), strict=True)}
    return votes, slots


@given(bec_cases())
def test_matches_brute_force(case: dict) -> None:
    d = run(case)
    votes, slots = reference(case, d.coreset_mask)
    batch, length, num_experts = case["logits"].shape
    assert d.coreset_mask.shape == (batch, len(blocks_of(case)), num_experts)
    for b in range(batch):
        for p, v in enumerate(votes[b]):
            mask = d.coreset_mask[b, p].tolist()
            inside = [v[e] for e in range(num_experts) if mask[e]]
            outside = [v[e] for e in range(num_experts) if not mask[e]]
            assert len(inside) >= case["guard"]
            if sum(v) > 0:
                assert len(inside) in reference_coreset_sizes(v, case["top_p"], case["guard"])
                if outside:
                    assert min(inside) >= max(outside) - 1e-6
    got = {(t, e): g for t, e, g in zip(d.token_index.tolist(), d.expert_index.tolist(), d.gate.tolist(), strict=True)}
    assert set(got) == set(slots)
    for key, g in got.items():
        assert g == pytest.approx(slots[key], rel=1e-5, abs=1e-6)


@given(bec_cases())
def test_budget_and_coreset_properties(case: dict) -> None:
    d = run(case)
    batch, length, num_experts = case["logits"].shape
    ks = case["k"].tolist() if isinstance(case["k"], torch.Tensor) else [case["k"]] * batch
    valid = case["valid"] if case["valid"] is not None else torch.ones(batch, length, dtype=torch.bool)
    blocks = blocks_of(case)
    block_of = [p for p, positions in enumerate(blocks) for _ in positions]
    assert d.block_index.tolist() == block_of
    assert d.equal_counts is False and float(d.aux_loss) == 0.0
    assert torch.equal(torch.bincount(d.expert_index, minlength=num_experts), d.counts)
    assert bool((d.expert_index[1:] >= d.expert_index[:-1]).all())
    held: dict[tuple[int, int, int], int] = {}
    for t, e in zip(d.token_index.tolist(), d.expert_index.tolist(), strict=True):
        b, pos = divmod(t, length)
        assert bool(valid[b, pos]), "a pad was chosen"
        assert bool(d.coreset_mask[b, block_of[pos], e]), "an expert outside the block's coreset took a token"
        held[(b, block_of[pos], e)] = held.get((b, block_of[pos], e), 0) + 1
    for b in range(batch):
        for p, positions in enumerate(blocks):
            n = int(valid[b, positions].sum())
            core = d.coreset_mask[b, p].nonzero().flatten().tolist()
            cap = min(max(n * ks[b] // len(core), 1), n) if n else 0
            assert all(held.get((b, p, e), 0) == cap for e in core)
            used = sum(held.get((b, p, e), 0) for e in range(num_experts))
            assert used == len(core) * cap
            if n * ks[b] >= len(core):  # the same budget as EC: at most n·k slots
                assert used <= n * ks[b]
    if case["gate"] in ("restricted", "restricted_sigmoid") and d.num_slots:
        sums = torch.zeros(batch * length).index_add_(0, d.token_index, d.gate)
        chosen = torch.bincount(d.token_index, minlength=batch * length) > 0
        torch.testing.assert_close(sums[chosen], torch.ones(int(chosen.sum())))
    per_block = unique_experts_per_block(d)
    assert bool((per_block <= d.coreset_mask.sum(-1)).all())


@given(bec_cases())
def test_one_block_with_every_expert_is_sequence_expert_choice(case: dict) -> None:
    # guard = E: the coreset is every expert, C = min(max(⌊n·k/E⌋, 1), n): plain EC of the row
    logits = case["logits"]
    length, num_experts = logits.shape[1], logits.shape[2]
    kw = dict(valid=case["valid"], select=case["select"], gate=case["gate"])
    d = block_expert_choice(
        logits, case["k"], block_ids=torch.zeros(length, dtype=torch.int64), guard=num_experts, **kw
    )
    ref = expert_choice(logits, case["k"], pool="sequence", **kw)
    for b in range(logits.shape[0]):
        assert_same_slots(row_slots(d, b), row_slots(ref, b), f"row {b}")


@given(bec_cases(), st.integers(0, 2**31 - 1))
def test_gates_differentiable(case: dict, seed: int) -> None:
    logits = case["logits"].clone().requires_grad_(True)
    d = block_expert_choice(logits, case["k"], block_ids=case["block_ids"], valid=case["valid"], guard=case["guard"])
    w = torch.randn(d.num_slots, generator=torch.Generator().manual_seed(seed))
    (d.gate * w).sum().backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())


def test_fewer_unique_experts_per_block_than_expert_choice() -> None:
    # a block whose tokens all prefer experts 0 and 1: EC spreads it over all 8, the coreset keeps it on 2
    logits = torch.full((1, 8, 8), -2.0) + torch.linspace(0, 0.5, 64).view(1, 8, 8)
    logits[..., :2] += 4.0
    ids = torch.zeros(8, dtype=torch.int64)
    d = block_expert_choice(logits, 2, block_ids=ids, top_p=0.9, guard=2)
    ec = expert_choice(logits, 2)
    assert d.coreset_mask[0, 0].nonzero().flatten().tolist() == [0, 1]
    assert unique_experts_per_block(d).tolist() == [[2]]
    assert unique_experts_per_block(ec, 8).tolist() == [[8]]
    assert d.num_slots == ec.num_slots == 16  # same budget n·k
    assert d.counts.tolist() == [8, 8, 0, 0, 0, 0, 0, 0]


def test_example_capacity_floor() -> None:
    # n = 1 valid token, k = 1, coreset of 3 (guard): C = max(⌊1·1/3⌋, 1) = 1 → 3 slots
    logits = torch.tensor([[[0.3, 0.2, 0.1, -1.0], [5.0, 5.0, 5.0, 5.0]]])
    valid = torch.tensor([[True, False]])
    d = block_expert_choice(logits, 1, block_ids=torch.tensor([7, 7]), valid=valid, guard=3)
    assert d.token_index.tolist() == [0, 0, 0]
    assert d.expert_index.tolist() == [0, 1, 2]
    assert math.isclose(float(d.gate.sum()), 1.0, rel_tol=1e-6)
    assert d.block_size is None and d.block_index.tolist() == [0, 0]
