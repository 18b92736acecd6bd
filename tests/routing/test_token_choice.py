"""Token-choice routing: top-k selection, capacity dropping, bias, groups and losses vs brute force."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dlmoe.routing import switch_aux_loss, token_choice, z_loss
from tests.routing.helpers import distinct_logits


@st.composite
def tc_cases(draw: st.DrawFn, min_experts: int = 1) -> tuple[torch.Tensor, int]:
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, 24))
    num_experts = draw(st.integers(min_experts, 12))
    k = draw(st.integers(1, num_experts))
    return distinct_logits(batch, length, num_experts, draw(st.integers(0, 2**31 - 1))), k


def scores_of(logits: torch.Tensor, score: str) -> torch.Tensor:
    flat = logits.reshape(-1, logits.shape[-1]).double()
    return torch.softmax(flat, -1) if score == "softmax" else torch.sigmoid(flat)


def reference_topk(choice_NE: torch.Tensor, k: int) -> list[set[int]]:
    """Brute force: each token's k experts with the largest choice values (python sort)."""
    rows = choice_NE.tolist()
    return [set(sorted(range(len(r)), key=lambda e, r=r: -r[e])[:k]) for r in rows]


def slot_gates(d) -> dict[tuple[int, int], float]:
    pairs = zip(d.token_index.tolist(), d.expert_index.tolist(), strict=True)
    return dict(zip(pairs, d.gate.tolist(), strict=True))


def per_token(d) -> dict[int, dict[int, float]]:
    out: dict[int, dict[int, float]] = {t: {} for t in range(d.num_tokens)}
    for t, e, g in zip(d.token_index.tolist(), d.expert_index.tolist(), d.gate.tolist(), strict=True):
        assert e not in out[t], "token routed twice to the same expert"
        out[t][e] = g
    return out


@given(
    tc_cases(),
    st.sampled_from(["softmax", "sigmoid"]),
    st.one_of(st.none(), st.floats(0.1, 2.0)),
    st.booleans(),
)
def test_at_most_k_distinct_experts_per_token(case, score: str, cf: float | None, renorm: bool) -> None:
    logits, k = case
    d = token_choice(logits, k, score=score, capacity_factor=cf, renormalize=renorm)
    routed = per_token(d)
    assert all(len(v) <= k for v in routed.values())
    assert bool((d.expert_index[1:] >= d.expert_index[:-1]).all())
    assert torch.equal(torch.bincount(d.expert_index, minlength=logits.shape[-1]), d.counts)
    assert d.num_requested_slots == d.num_tokens * k


@given(tc_cases(), st.sampled_from(["softmax", "sigmoid"]), st.booleans())
def test_dropless_matches_brute_force_topk(case, score: str, renorm: bool) -> None:
    logits, k = case
    d = token_choice(logits, k, score=score, renormalize=renorm)
    assert d.num_slots == d.num_tokens * k
    s = scores_of(logits, score)
    ref = reference_topk(s, k)
    routed = per_token(d)
    for t in range(d.num_tokens):
        assert set(routed[t]) == ref[t]
        denom = sum(float(s[t, e]) for e in ref[t]) if renorm else 1.0
        for e, g in routed[t].items():
            assert g == pytest.approx(float(s[t, e]) / denom, rel=1e-5, abs=1e-7)
        if renorm:
            assert sum(routed[t].values()) == pytest.approx(1.0, abs=1e-5)
    assert d.stats().dropped_fraction == 0.0


@given(tc_cases(), st.floats(0.05, 2.0), st.sampled_from(["softmax", "sigmoid"]), st.booleans())
def test_capacity_keeps_top_gates_of_overloaded_experts(case, cf: float, score: str, renorm: bool) -> None:
    logits, k = case
    num_experts = logits.shape[-1]
    full = token_choice(logits, k, score=score, renormalize=renorm)
    d = token_choice(logits, k, score=score, renormalize=renorm, capacity_factor=cf)
    cap = math.ceil(d.num_tokens * k / num_experts * cf)
    assert int(d.counts.max()) <= cap
    assert torch.equal(d.requested_counts, full.counts)
    all_slots = slot_gates(full)
    kept = slot_gates(d)
    assert set(kept) <= set(all_slots)
    for (t, e), g in kept.items():  # survivors keep their gates (no renormalisation after the drop)
        assert g == all_slots[(t, e)]
    for e in range(num_experts):
        requested = [g for (t, x), g in all_slots.items() if x == e]
        survivors = [g for (t, x), g in kept.items() if x == e]
        dropped = [g for (t, x), g in all_slots.items() if x == e and (t, x) not in kept]
        assert len(survivors) == min(len(requested), cap)
        if len(requested) <= cap:
            assert not dropped
        elif survivors:
            assert min(survivors) >= max(dropped)
    assert d.stats().dropped_fraction == pytest.approx((full.num_slots - d.num_slots) / (d.num_tokens * k))


def test_capacity_drop_example() -> None:
    # 4 tokens, E=2, k=1, cf=0.5 -> C = ceil(4/2*0.5) = 1; tokens 0..2 want expert 0, token 3 expert 1
    logits = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [0.0, 1.0]]])
    d = token_choice(logits, 1, capacity_factor=0.5, renormalize=False)
    assert d.token_index.tolist() == [1, 3]
    assert d.expert_index.tolist() == [0, 1]
    assert d.requested_counts.tolist() == [3, 1]


@given(tc_cases(), st.integers(0, 2**31 - 1), st.sampled_from(["softmax", "sigmoid"]), st.booleans())
def test_expert_bias_selects_but_gates_are_unbiased(case, seed: int, score: str, renorm: bool) -> None:
    logits, k = case
    num_experts = logits.shape[-1]
    bias = torch.rand(num_experts, generator=torch.Generator().manual_seed(seed)) * 0.6 - 0.3
    d = token_choice(logits, k, score=score, expert_bias=bias, renormalize=renorm)
    s = scores_of(logits, score)
    ref = reference_topk(s + bias.double(), k)
    routed = per_token(d)
    for t in range(d.num_tokens):
        assert set(routed[t]) == ref[t]
        denom = sum(float(s[t, e]) for e in ref[t]) if renorm else 1.0
        for e, g in routed[t].items():
            assert g == pytest.approx(float(s[t, e]) / denom, rel=1e-5, abs=1e-7)


def test_expert_bias_changes_selection() -> None:
    logits = distinct_logits(2, 6, 5, seed=1)
    worst = int(torch.softmax(logits, -1).sum((0, 1)).argmin())
    plain = token_choice(logits, 1)
    bias = torch.zeros(5)
    bias[worst] = 10.0
    biased = token_choice(logits, 1, expert_bias=bias, renormalize=False)
    assert set(plain.expert_index.tolist()) != {worst}
    assert biased.expert_index.tolist() == [worst] * 12
    torch.testing.assert_close(biased.gate, torch.softmax(logits, -1).reshape(-1, 5)[:, worst])


@st.composite
def group_cases(draw: st.DrawFn) -> tuple[torch.Tensor, int, int, int]:
    n_group = draw(st.integers(1, 4))
    group_size = draw(st.integers(1, 4))
    num_experts = n_group * group_size
    topk_group = draw(st.integers(1, n_group))
    k = draw(st.integers(1, topk_group * group_size))
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    return distinct_logits(batch, length, num_experts, draw(st.integers(0, 2**31 - 1))), k, n_group, topk_group


@given(group_cases(), st.sampled_from(["softmax", "sigmoid"]))
def test_group_limited_topk(case, score: str) -> None:
    logits, k, n_group, topk_group = case
    num_experts = logits.shape[-1]
    gsize = num_experts // n_group
    d = token_choice(logits, k, score=score, n_group=n_group, topk_group=topk_group)
    s = scores_of(logits, score).tolist()
    routed = per_token(d)
    for t in range(d.num_tokens):
        row = s[t]
        group_score = [sum(sorted(row[g * gsize : (g + 1) * gsize], reverse=True)[:2]) for g in range(n_group)]
        best_groups = set(sorted(range(n_group), key=lambda g, gs=group_score: -gs[g])[:topk_group])
        allowed = [e for e in range(num_experts) if e // gsize in best_groups]
        ref = set(sorted(allowed, key=lambda e, row=row: -row[e])[:k])
        assert set(routed[t]) == ref
        assert {e // gsize for e in routed[t]} <= best_groups


def test_group_limited_example() -> None:
    # 4 experts in 2 groups; best single expert (3) in group 1, but group 0 has the best top-2 sum
    scores = torch.tensor([[[0.40, 0.40, 0.10, 0.45]]])
    d = token_choice(scores.log(), 1, score="softmax", n_group=2, topk_group=1)
    assert d.expert_index.tolist() in ([0], [1])
    d2 = token_choice(scores.log(), 1, score="softmax")
    assert d2.expert_index.tolist() == [3]


@given(tc_cases(), st.floats(0.1, 5.0), st.sampled_from(["softmax", "sigmoid"]), st.booleans())
def test_routed_scaling_factor_multiplies_gates(case, factor: float, score: str, renorm: bool) -> None:
    logits, k = case
    base = token_choice(logits, k, score=score, renormalize=renorm)
    scaled = token_choice(logits, k, score=score, renormalize=renorm, routed_scaling_factor=factor)
    assert torch.equal(base.token_index, scaled.token_index)
    assert torch.equal(base.expert_index, scaled.expert_index)
    torch.testing.assert_close(scaled.gate, base.gate * factor, rtol=1e-5, atol=1e-7)


@given(tc_cases(), st.floats(1e-3, 1.0), st.sampled_from(["softmax", "sigmoid"]), st.one_of(st.none(), st.just(0.5)))
def test_aux_loss_formula(case, alpha: float, score: str, cf: float | None) -> None:
    logits, k = case
    num_experts = logits.shape[-1]
    d = token_choice(logits, k, score=score, aux_loss_coef=alpha, capacity_factor=cf)
    s = scores_of(logits, score)
    probs = (s / s.sum(-1, keepdim=True)).tolist()  # rows of p_{t,e} sum to 1
    n = len(probs)
    counts = [0] * num_experts  # slots per expert before any drop
    for chosen in reference_topk(s, k):
        for e in chosen:
            counts[e] += 1
    ref = alpha * num_experts / (n * n * k) * sum(sum(p[e] for p in probs) * counts[e] for e in range(num_experts))
    assert float(d.aux_loss) == pytest.approx(ref, rel=1e-5)
    assert float(token_choice(logits, k, score=score).aux_loss) == 0.0


@given(st.integers(1, 4), st.integers(1, 16), st.integers(1, 12), st.data())
def test_aux_loss_is_alpha_at_uniform_routing(batch: int, length: int, num_experts: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, num_experts))
    alpha = data.draw(st.floats(1e-3, 1.0))
    d = token_choice(torch.zeros(batch, length, num_experts), k, aux_loss_coef=alpha)
    assert float(d.aux_loss) == pytest.approx(alpha, rel=1e-5)
    # equal counts too: N tokens spread round-robin over the experts
    probs = torch.full((num_experts * 3, num_experts), 1.0 / num_experts)
    counts = torch.full((num_experts,), 3 * k)
    assert float(switch_aux_loss(probs, counts, k)) == pytest.approx(1.0, rel=1e-6)


def test_aux_loss_above_alpha_when_imbalanced() -> None:
    logits = torch.zeros(1, 8, 4)
    logits[..., 0] = 3.0  # every token prefers expert 0
    d = token_choice(logits, 1, aux_loss_coef=1.0)
    assert float(d.aux_loss) > 1.5


@given(tc_cases(), st.floats(1e-4, 1.0), st.sampled_from(["softmax", "sigmoid"]))
def test_z_loss_formula(case, beta: float, score: str) -> None:
    logits, k = case
    flat = logits.reshape(-1, logits.shape[-1]).double()
    ref = beta * sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in flat.tolist()) / flat.shape[0]
    d = token_choice(logits, k, score=score, z_loss_coef=beta)
    assert float(d.aux_loss) == pytest.approx(ref, rel=1e-5)
    assert float(z_loss(flat)) == pytest.approx(ref / beta, rel=1e-6)


@given(tc_cases(), st.integers(0, 2**31 - 1), st.one_of(st.none(), st.floats(0.2, 1.5)))
def test_combine_equals_dense_sum(case, seed: int, cf: float | None) -> None:
    logits, k = case
    num_experts = logits.shape[-1]
    g = torch.Generator().manual_seed(seed)
    d = token_choice(logits, k, capacity_factor=cf)
    dim = 3
    x = torch.randn(d.num_tokens, dim, generator=g, dtype=torch.float64)
    w = torch.randn(num_experts, dim, dim, generator=g, dtype=torch.float64)
    # expert e maps x -> tanh(x @ W_e); slot outputs in slot order
    y = torch.tanh(torch.einsum("sd,sdf->sf", d.gather(x), w[d.expert_index]))
    out = d.combine(y)
    dense_gate = torch.zeros(d.num_tokens, num_experts, dtype=torch.float64)
    if cf is None:  # brute-force gates: renormalised softmax over each token's top-k
        probs = scores_of(logits, "softmax")
        for t, chosen in enumerate(reference_topk(probs, k)):
            for e in chosen:
                dense_gate[t, e] = probs[t, e] / sum(probs[t, c] for c in chosen)
    else:  # kept slots only
        for t, e, gt in zip(d.token_index.tolist(), d.expert_index.tolist(), d.gate.tolist(), strict=True):
            dense_gate[t, e] = gt
    every_expert_NED = torch.tanh(torch.einsum("nd,edf->nef", x, w))  # every expert on every token
    ref = (dense_gate.unsqueeze(-1) * every_expert_NED).sum(1)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    assert out.dtype == torch.float64
