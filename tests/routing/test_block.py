"""dMoE block routing: votes, top-p coreset with guard, restricted top-k, vs brute-force references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dlmoe.routing import block_expert_choice, block_route, token_choice, unique_experts_per_block
from dlmoe.routing.block import block_votes, top_p_coreset
from tests.routing.helpers import distinct_logits


def score_fn(logits: torch.Tensor, score: str) -> torch.Tensor:
    return torch.softmax(logits, -1) if score == "softmax" else torch.sigmoid(logits)


@st.composite
def block_cases(draw: st.DrawFn) -> dict:
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 24))
    num_experts = draw(st.integers(1, 12))
    score = draw(st.sampled_from(["softmax", "sigmoid"]))
    logits = distinct_logits(batch, length, num_experts, draw(st.integers(0, 2**31 - 1)))
    bias = None
    if draw(st.booleans()):  # small non-negative bias: biased scores stay positive, votes stay a distribution
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
        bias = torch.rand(num_experts, generator=g) * 0.2
    return {
        "logits": logits,
        "scores": score_fn(logits, score),
        "k": draw(st.integers(1, num_experts)),
        "block_size": draw(st.integers(1, length + 4)),
        "top_p": draw(st.sampled_from([1.0, 0.9, 0.6, 0.3, 0.05])),
        "guard": draw(st.integers(1, num_experts)),
        "expert_bias": bias,
        "score": score,
    }


def reference_votes(choice_BLE: torch.Tensor, k: int, block_size: int) -> list[list[list[float]]]:
    """Brute force: per (sequence, block), sum of each token's top-k choice values, normalised to 1."""
    batch, length, num_experts = choice_BLE.shape
    block_size = min(block_size, length)
    out = []
    for b in range(batch):
        row = []
        for start in range(0, length, block_size):
            v = [0.0] * num_experts
            for i in range(start, min(start + block_size, length)):
                c = choice_BLE[b, i].tolist()
                for e in sorted(range(num_experts), key=lambda e, c=c: -c[e])[:k]:
                    v[e] += c[e]
            total = sum(v)
            row.append([x / total for x in v])
        out.append(row)
    return out


def reference_coreset_sizes(votes: list[float], top_p: float, guard: int) -> set[int]:
    """Sizes allowed for the coreset (dMoE): by descending vote, keep an expert while the mass
    ranked above it is <= top_p (only voted experts; always the top-1), then enlarge to `guard`.

    Where the mass before an expert lies within float rounding of top_p both sizes are allowed.
    """
    taken, before, sizes = 0, 0.0, set()
    for v in sorted(votes, reverse=True):
        if v <= 0 or before > top_p + 1e-6:
            break
        if taken and before >= top_p - 1e-6:  # within rounding: stopping here is allowed too
            sizes.add(max(taken, guard))
        taken += 1
        before += v
    sizes.add(max(taken, guard, 1))
    return sizes


def per_token(d) -> dict[int, dict[int, float]]:
    out: dict[int, dict[int, float]] = {t: {} for t in range(d.num_tokens)}
    for t, e, g in zip(d.token_index.tolist(), d.expert_index.tolist(), d.gate.tolist(), strict=True):
        assert e not in out[t]
        out[t][e] = g
    return out


def run(case: dict, **overrides) -> object:
    kw = {k: v for k, v in case.items() if k not in ("logits", "scores", "k", "score")} | overrides
    return block_route(case["scores"], case["k"], **kw)


@given(block_cases())
def test_votes_and_coreset_match_brute_force(case: dict) -> None:
    d = run(case)
    scores, k, bias = case["scores"], case["k"], case["expert_bias"]
    batch, length, num_experts = scores.shape
    choice = scores.double() if bias is None else scores.double() + bias.double()
    votes = reference_votes(choice, k, case["block_size"])
    num_blocks = len(votes[0])
    assert d.block_size == min(case["block_size"], length)
    assert d.coreset_mask.shape == (batch, num_blocks, num_experts)
    assert num_blocks == math.ceil(length / d.block_size)
    got_votes = block_votes(choice.float(), k, d.block_size)
    torch.testing.assert_close(got_votes.double(), torch.tensor(votes, dtype=torch.float64), atol=1e-5, rtol=1e-5)
    for b in range(batch):
        for p in range(num_blocks):
            v = votes[b][p]
            mask = d.coreset_mask[b, p].tolist()
            inside = [v[e] for e in range(num_experts) if mask[e]]
            outside = [v[e] for e in range(num_experts) if not mask[e]]
            assert len(inside) in reference_coreset_sizes(v, case["top_p"], case["guard"])
            assert len(inside) >= case["guard"]
            if outside:  # a top-voted prefix (up to rounding of equal votes)
                assert min(inside) >= max(outside) - 1e-6


@given(block_cases())
def test_tokens_choose_topk_inside_their_block_coreset(case: dict) -> None:
    d = run(case)
    scores, k, bias = case["scores"], case["k"], case["expert_bias"]
    batch, length, num_experts = scores.shape
    choice = (scores.double() if bias is None else scores.double() + bias.double()).reshape(-1, num_experts)
    routed = per_token(d)
    for t in range(d.num_tokens):
        b, pos = divmod(t, length)
        core = [e for e in range(num_experts) if d.coreset_mask[b, pos // d.block_size, e]]
        assert set(routed[t]) <= set(core)
        ref = sorted(core, key=lambda e, t=t: -float(choice[t, e]))[:k]
        assert set(routed[t]) == set(ref)
        assert len(routed[t]) == min(k, len(core))


@given(block_cases(), st.floats(0.5, 3.0))
def test_gates_renormalised_and_scaled(case: dict, factor: float) -> None:
    d = run(case, routed_scaling_factor=factor)
    scores = case["scores"].reshape(-1, case["scores"].shape[-1]).double()
    for t, eg in per_token(d).items():
        denom = sum(float(scores[t, e]) for e in eg)
        assert sum(eg.values()) == pytest.approx(factor, rel=1e-5)
        for e, g in eg.items():  # unbiased scores, even when the bias steered the choice
            assert g == pytest.approx(factor * float(scores[t, e]) / denom, rel=1e-5)
    raw = run(case, renormalize=False)
    for t, eg in per_token(raw).items():
        for e, g in eg.items():
            assert g == pytest.approx(float(scores[t, e]), rel=1e-6)


@given(block_cases())
def test_full_coreset_equals_token_choice(case: dict) -> None:
    scores, k = case["scores"], case["k"]
    num_experts = scores.shape[-1]
    d = run(case, top_p=1.0, guard=num_experts)
    assert bool(d.coreset_mask.all())
    tc = token_choice(case["logits"], k, score=case["score"], expert_bias=case["expert_bias"])
    assert torch.equal(d.token_index, tc.token_index)
    assert torch.equal(d.expert_index, tc.expert_index)
    assert torch.equal(d.counts, tc.counts)
    torch.testing.assert_close(d.gate, tc.gate, rtol=1e-5, atol=1e-6)


@given(block_cases(), st.data())
def test_group_limited_stays_inside_coreset(case: dict, data: st.DataObject) -> None:
    num_experts = case["scores"].shape[-1]
    n_group = data.draw(st.sampled_from([g for g in range(1, num_experts + 1) if num_experts % g == 0]))
    gsize = num_experts // n_group
    topk_group = data.draw(st.integers(1, n_group))
    k = data.draw(st.integers(1, topk_group * gsize))
    d = run(case | {"k": k}, n_group=n_group, topk_group=topk_group)
    length = case["scores"].shape[1]
    for t, eg in per_token(d).items():
        b, pos = divmod(t, length)
        assert 1 <= len(eg) <= k
        for e in eg:
            assert bool(d.coreset_mask[b, pos // d.block_size, e])
        assert len({e // gsize for e in eg}) <= topk_group


def reference_group_topk(choice: list[float], allowed: list[bool], k: int, n_group: int, topk_group: int) -> set[int]:
    """Group-limited top-k inside a coreset: groups ranked by their two best *allowed* choice values
    (a group holding fewer allowed experts ranks below one holding more), then top-k allowed experts."""
    gsize = len(choice) // n_group
    best = min(2, gsize)

    def key(g: int) -> tuple[int, float]:
        vals = sorted((choice[e] for e in range(g * gsize, (g + 1) * gsize) if allowed[e]), reverse=True)[:best]
        return len(vals), sum(vals)

    groups = set(sorted(range(n_group), key=key, reverse=True)[:topk_group])
    pool = [e for e in range(len(choice)) if allowed[e] and e // gsize in groups]
    return set(sorted(pool, key=lambda e: -choice[e])[:k])


def test_group_limited_in_coreset_example() -> None:
    # regression: groups were ranked on choice.masked_fill(~allowed, -1e9) in float32, where -1e9 + s == -1e9,
    # so groups holding one coreset expert tied and the lowest group index won
    s = torch.full((1, 2, 8), 0.01)
    s[0, 0, 4], s[0, 0, 0] = 0.9, 0.1  # token 0: best expert 4 (group 1)
    s[0, 1, 0], s[0, 1, 4] = 0.9, 0.1  # token 1: best expert 0 (group 0)
    d = block_route(s, 1, block_size=2, top_p=0.99, guard=1, n_group=2, topk_group=1)
    assert d.coreset_mask[0, 0].nonzero().flatten().tolist() == [0, 4]
    # token 0's best expert is in the coreset and its group holds the best allowed score
    assert dict(zip(d.token_index.tolist(), d.expert_index.tolist(), strict=True)) == {0: 4, 1: 0}


@st.composite
def small_coreset_group_cases(draw: st.DrawFn) -> tuple[dict, int, int]:
    """Block cases with groups and small coresets, where groups often hold fewer than two coreset experts."""
    n_group, gsize = draw(st.integers(2, 4)), draw(st.integers(2, 3))
    num_experts = n_group * gsize
    batch, length = draw(st.integers(1, 2)), draw(st.integers(1, 12))
    logits = distinct_logits(batch, length, num_experts, draw(st.integers(0, 2**31 - 1)))
    topk_group = draw(st.integers(1, n_group - 1))
    case = {
        "logits": logits,
        "scores": torch.sigmoid(logits),
        "k": draw(st.integers(1, 2)),
        "block_size": draw(st.integers(1, 4)),
        "top_p": draw(st.sampled_from([0.05, 0.2, 0.4])),
        "guard": draw(st.integers(1, 2)),
        "expert_bias": None,
        "score": "sigmoid",
    }
    return case, n_group, topk_group


@given(small_coreset_group_cases())
def test_group_limited_in_coreset_matches_reference(group_case: tuple[dict, int, int]) -> None:
    case, n_group, topk_group = group_case
    num_experts = case["scores"].shape[-1]
    k = case["k"]
    d = run(case, n_group=n_group, topk_group=topk_group)
    length = case["scores"].shape[1]
    choice = case["scores"].double().reshape(-1, num_experts)
    routed = per_token(d)
    for t in range(d.num_tokens):
        b, pos = divmod(t, length)
        allowed = d.coreset_mask[b, pos // d.block_size].tolist()
        assert set(routed[t]) == reference_group_topk(choice[t].tolist(), allowed, k, n_group, topk_group)


@given(st.integers(1, 3), st.integers(2, 24), st.integers(2, 8), st.integers(0, 2**31 - 1), st.sampled_from([0.3, 0.9]))
def test_short_last_block_counts_only_its_tokens(batch: int, length: int, block_size: int, seed: int, p: float) -> None:
    num_experts, k = 6, 2
    scores = torch.sigmoid(distinct_logits(batch, length, num_experts, seed))
    d = block_route(scores, k, block_size=block_size, top_p=p, guard=1)
    assert bool(torch.isfinite(d.gate).all())
    bs = min(block_size, length)
    last_start = (math.ceil(length / bs) - 1) * bs
    # the last block's coreset depends only on its own tokens: routing the tail alone gives the same coreset
    tail = block_route(scores[:, last_start:], k, block_size=bs, top_p=p, guard=1)
    assert torch.equal(d.coreset_mask[:, -1], tail.coreset_mask[:, 0])
    votes = block_votes(scores, k, bs)
    assert bool(torch.isfinite(votes).all())
    torch.testing.assert_close(votes.sum(-1), torch.ones(votes.shape[:2]))


def test_short_last_block_example() -> None:
    # L=5, block 4: the last block is the single token 4, which prefers expert 2 only
    scores = torch.full((1, 5, 3), 0.01)
    scores[0, :4, 0] = 0.9
    scores[0, 4, 2] = 0.9
    d = block_route(scores, 1, block_size=4, top_p=0.5, guard=1)
    assert d.coreset_mask[0].tolist() == [[True, False, False], [False, False, True]]
    assert d.expert_index[d.token_index == 4].tolist() == [2]


@given(block_cases())
def test_unique_experts_per_block_within_coreset(case: dict) -> None:
    d = run(case)
    per_block = unique_experts_per_block(d, d.block_size)
    core_size = d.coreset_mask.sum(-1)
    assert per_block.shape == core_size.shape
    assert bool((per_block <= core_size).all())
    assert bool((per_block >= 1).all())
    stats = d.stats()
    assert stats.unique_experts_per_block == pytest.approx(per_block.float().mean().item())
    assert stats.unique_experts_per_block <= core_size.float().mean().item() + 1e-9


def test_top_p_coreset_example() -> None:
    votes = torch.tensor([[[0.1, 0.5, 0.15, 0.25]]])
    assert top_p_coreset(votes, 0.6, 1).tolist() == [[[False, True, False, True]]]
    # the top-1 alone holds 0.5: its mass reaches top_p = 0.5 but does not exceed it, so the next one is taken
    assert top_p_coreset(votes, 0.5, 1).tolist() == [[[False, True, False, True]]]
    assert top_p_coreset(votes, 0.49, 1).tolist() == [[[False, True, False, False]]]
    assert top_p_coreset(votes, 0.76, 1).tolist() == [[[False, True, True, True]]]
    assert top_p_coreset(votes, 0.6, 3).tolist() == [[[False, True, True, True]]]
    assert top_p_coreset(votes, 0.01, 1).tolist() == [[[False, True, False, False]]]  # always the top-1


def test_top_p_one_keeps_only_voted_experts() -> None:
    # regression: `cumsum - vote < top_p` in float32 let a cumulative 0.99999994 < 1.0 add every zero-vote expert
    # 5 tokens in one block, each votes (k=1) for its own expert 0..4; experts 5 and 6 get no vote
    scores = torch.full((1, 5, 7), 0.01)
    scores[0, torch.arange(5), torch.arange(5)] = 0.9
    d = block_route(scores, 1, block_size=5, top_p=1.0, guard=1)
    assert d.coreset_mask[0, 0].tolist() == [True] * 5 + [False] * 2


# ---------------------------------------------------------------------------------------------
# the top-p boundary (dMoE): keep expert j while the vote mass before it is <= top_p


def test_top_p_exact_ties_take_the_next_expert() -> None:
    # votes exact in binary: expert 1 = 0.5, experts 0 and 3 = 0.25 (0 first on the tie), expert 2 none
    votes = torch.tensor([[[0.25, 0.5, 0.0, 0.25]]])
    cases = [
        (0.25, 1, [False, True, False, False]),  # mass before expert 0 is 0.5 > 0.25
        (0.4999, 1, [False, True, False, False]),
        (0.5, 1, [True, True, False, False]),  # 0.5 reached, not exceeded: the next expert too
        (0.625, 1, [True, True, False, False]),
        (0.75, 1, [True, True, False, True]),  # 0.75 reached: the third voted expert too
        (0.7499, 1, [True, True, False, False]),
        (1.0, 1, [True, True, False, True]),  # every voted expert, no zero-vote one
        (0.5, 4, [True, True, True, True]),  # the guard may add zero-vote experts
        (1.0, 3, [True, True, False, True]),
    ]
    for top_p, guard, want in cases:
        assert top_p_coreset(votes, top_p, guard).tolist() == [[want]], (top_p, guard)


def test_top_p_one_keeps_every_voted_expert_whatever_the_rounding() -> None:
    # normalised votes summing to slightly more than 1 in float: a mass before the last voted expert
    # above 1.0 must not drop it at top_p = 1
    raw = torch.tensor([1.0, 1e-9, 1e-9, 1e-9, 0.3, 0.0], dtype=torch.float64)
    votes = (raw / raw.sum()).float().view(1, 1, -1)
    assert top_p_coreset(votes, 1.0, 1).tolist() == [[[True] * 5 + [False]]]


def dmoe_coreset(votes: list[float], top_p: float, guard: int) -> set[int]:
    """dMoE's `block_experts_select` step by step: sort, cumsum, keep `cum <= p`, the first expert with
    `cum > p` and the top-1; if fewer than `guard`, the top-`guard` by vote instead."""
    order = sorted(range(len(votes)), key=lambda e: -votes[e])
    keep, cum, exceeded = set(), 0.0, False
    for j, e in enumerate(order):
        cum += votes[e]
        if cum <= top_p or j == 0 or (cum > top_p and not exceeded):
            keep.add(e)
        exceeded = exceeded or cum > top_p
    return set(order[:guard]) if len(keep) < guard else keep


@given(st.lists(st.integers(0, 8), min_size=1, max_size=9), st.integers(1, 128), st.integers(1, 10))
def test_top_p_coreset_matches_dmoe_on_exact_votes(counts: list[int], p128: int, guard: int) -> None:
    # votes c / 2^m (a last count fills the total up to 2^m) and top_p = j / 128: every sum is exact,
    # so cumulative votes hit top_p exactly in many draws
    scale = 1 << max(sum(counts), 1).bit_length()
    counts = [*counts, scale - sum(counts)]
    votes = [c / scale for c in counts]
    num_experts = len(votes)
    guard = min(guard, num_experts)
    top_p = p128 / 128
    got = top_p_coreset(torch.tensor(votes).view(1, 1, -1), top_p, guard)[0, 0]
    order = sorted(range(num_experts), key=lambda e: -votes[e])
    # dMoE's rule, except that a zero-vote expert enters only through the guard
    want = {e for e in dmoe_coreset(votes, top_p, guard) if votes[e] > 0 or e in order[:guard]}
    assert set(got.nonzero().flatten().tolist()) == want, (votes, top_p, guard)


def test_exact_tie_in_block_route_and_block_expert_choice() -> None:
    # one block of 4 tokens, k = 1, one-hot softmax (exp(-200) is 0 in float32): tokens 0, 1 vote
    # for expert 0, token 2 for expert 1, token 3 for expert 2 -> votes [0.5, 0.25, 0.25, 0]
    logits = torch.full((1, 4, 4), -200.0)
    logits[0, [0, 1, 2, 3], [0, 0, 1, 2]] = 0.0
    scores = torch.softmax(logits, -1)
    assert block_votes(scores, 1, 4).tolist() == [[[0.5, 0.25, 0.25, 0.0]]]
    for top_p, want in [(0.4, [True, False, False, False]), (0.5, [True, True, False, False]),
                        (0.75, [True, True, True, False]), (1.0, [True, True, True, False])]:  # fmt: skip
        tc = block_route(scores, 1, block_size=4, top_p=top_p, guard=1)
        ec = block_expert_choice(logits, 1, block_size=4, top_p=top_p, guard=1)
        assert tc.coreset_mask[0, 0].tolist() == want, top_p
        assert ec.coreset_mask[0, 0].tolist() == want, top_p
