"""Expert-choice routing: capacities, selection, gates and gradients against brute-force references."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dlmoe.routing import expert_choice
from dlmoe.routing.expert_choice import expert_choice_pooled
from tests.routing.helpers import distinct_logits, generic_logits


@st.composite
def ec_cases(draw: st.DrawFn, per_sample: bool | None = None) -> tuple[torch.Tensor, int | torch.Tensor]:
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, 24))
    num_experts = draw(st.integers(1, 12))
    logits = distinct_logits(batch, length, num_experts, draw(st.integers(0, 2**31 - 1)))
    if per_sample is None:
        per_sample = draw(st.booleans())
    if per_sample:
        k = torch.tensor([draw(st.integers(1, num_experts)) for _ in range(batch)], dtype=torch.int64)
    else:
        k = draw(st.integers(1, num_experts))
    return logits, k


def k_list(k: int | torch.Tensor, batch: int) -> list[int]:
    return k.tolist() if isinstance(k, torch.Tensor) else [k] * batch


def reference_choice(logits: torch.Tensor, k: int | torch.Tensor, pool: str, select: str) -> set[tuple[int, int]]:
    """Brute force: (token, expert) pairs picked when each expert sorts its pool's tokens."""
    batch, length, num_experts = logits.shape
    ks = k_list(k, batch)
    flat = logits.reshape(-1, num_experts).double()
    rank = flat if select == "logit" else torch.softmax(flat, dim=-1)
    rank_rows = rank.tolist()
    if pool == "sequence":
        pools = [(range(b * length, (b + 1) * length), max(length * ks[b] // num_experts, 1)) for b in range(batch)]
    else:
        pools = [(range(batch * length), max(length * sum(ks) // num_experts, 1))]
    chosen = set()
    for tokens, cap in pools:
        for e in range(num_experts):
            best = sorted(tokens, key=lambda t, e=e: -rank_rows[t][e])[:cap]
            chosen |= {(t, e) for t in best}
    return chosen


def slots(d) -> list[tuple[int, int]]:
    return list(zip(d.token_index.tolist(), d.expert_index.tolist(), strict=True))


@given(ec_cases())
def test_sequence_pool_each_expert_holds_capacity_of_every_sequence(case) -> None:
    logits, k = case
    batch, length, num_experts = logits.shape
    d = expert_choice(logits, k, pool="sequence")
    caps = [max(length * kb // num_experts, 1) for kb in k_list(k, batch)]
    pairs = slots(d)
    assert len(set(pairs)) == len(pairs), "an expert holds the same token twice"
    for e in range(num_experts):
        for b in range(batch):
            toks = [t for t, x in pairs if x == e and t // length == b]
            assert len(toks) == caps[b]
    assert d.num_slots == num_experts * sum(caps)


@given(ec_cases())
def test_batch_pool_capacity_is_shared_budget(case) -> None:
    logits, k = case
    batch, length, num_experts = logits.shape
    d = expert_choice(logits, k, pool="batch")
    cap = max(length * sum(k_list(k, batch)) // num_experts, 1)
    pairs = slots(d)
    assert len(set(pairs)) == len(pairs)
    assert torch.equal(d.counts, torch.full((num_experts,), cap, dtype=torch.int64))
    for e in range(num_experts):
        assert sum(1 for _, x in pairs if x == e) == cap


@given(ec_cases(), st.sampled_from(["sequence", "batch"]), st.sampled_from(["logit", "score"]))
def test_selection_matches_brute_force_top_c(case, pool: str, select: str) -> None:
    logits, k = case
    d = expert_choice(logits, k, pool=pool, select=select)
    assert set(slots(d)) == reference_choice(logits, k, pool, select)
    assert d.num_slots == len(reference_choice(logits, k, pool, select))


def test_logit_and_score_selection_differ() -> None:
    # token 0: logit 2.0 for expert 0 but a large competitor; token 1: logit 1.0 alone -> higher score
    logits = torch.tensor([[[2.0, 5.0], [1.0, -5.0]]])
    by_logit = expert_choice(logits, 1, select="logit")
    by_score = expert_choice(logits, 1, select="score")
    pick = lambda d: {e: t for t, e in slots(d)}
    assert pick(by_logit)[0] == 0
    assert pick(by_score)[0] == 1


@given(ec_cases(), st.sampled_from(["sequence", "batch"]))
def test_restricted_gates_are_softmax_over_choosing_experts(case, pool: str) -> None:
    logits, k = case
    num_experts = logits.shape[-1]
    d = expert_choice(logits, k, pool=pool, gate="restricted")
    flat = logits.reshape(-1, num_experts).double()
    by_token: dict[int, list[tuple[int, float]]] = {}
    for (t, e), g in zip(slots(d), d.gate.tolist(), strict=True):
        by_token.setdefault(t, []).append((e, g))
    for t, eg in by_token.items():
        experts = [e for e, _ in eg]
        ref = torch.softmax(flat[t, experts], dim=0)
        assert math.isclose(sum(g for _, g in eg), 1.0, rel_tol=0, abs_tol=1e-5)
        for (_, g), r in zip(eg, ref.tolist(), strict=True):
            assert g == pytest.approx(r, abs=1e-5)
    # tokens that no expert chose have no slot and zero routed output
    per_token = d.experts_per_token()
    zero = [t for t in range(d.num_tokens) if t not in by_token]
    assert all(per_token[t] == 0 for t in zero)
    out = d.combine(torch.ones(d.num_slots, 3))
    for t in zero:
        assert torch.equal(out[t], torch.zeros(3))
    assert d.stats().zero_expert_fraction == pytest.approx(len(zero) / d.num_tokens)


@given(ec_cases(), st.sampled_from(["logit", "score"]))
def test_full_gate_is_full_softmax(case, select: str) -> None:
    logits, k = case
    num_experts = logits.shape[-1]
    d = expert_choice(logits, k, select=select, gate="full")
    probs = torch.softmax(logits.reshape(-1, num_experts).double(), dim=-1)
    torch.testing.assert_close(d.gate.double(), probs[d.token_index, d.expert_index], atol=1e-6, rtol=1e-5)


@given(ec_cases(), st.sampled_from(["sequence", "batch"]))
def test_equal_counts_and_sorted_experts(case, pool: str) -> None:
    logits, k = case
    num_experts = logits.shape[-1]
    d = expert_choice(logits, k, pool=pool)
    assert d.equal_counts is True
    assert d.counts.shape == (num_experts,)
    assert bool((d.counts == d.counts[0]).all())
    assert int(d.counts.sum()) == d.num_slots
    assert bool((d.expert_index[1:] >= d.expert_index[:-1]).all())
    assert torch.equal(torch.bincount(d.expert_index, minlength=num_experts), d.counts)
    assert d.gate.dtype == torch.float32
    assert d.token_index.dtype == torch.int64 and d.expert_index.dtype == torch.int64


@given(ec_cases(), st.sampled_from(["restricted", "full", "restricted_sigmoid"]), st.integers(0, 2**31 - 1))
def test_gradient_flows_to_logits_and_matches_reference(case, gate: str, seed: int) -> None:
    logits, k = case
    num_experts = logits.shape[-1]
    logits = logits.clone().requires_grad_(True)
    d = expert_choice(logits, k, gate=gate)
    w = torch.randn(d.num_slots, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (d.gate.double() * w).sum().backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())

    # reference: same chosen set, gates recomputed in float64 with autograd
    ref_logits = logits.detach().double().reshape(-1, num_experts).requires_grad_(True)
    if gate == "restricted":
        chosen = torch.zeros(ref_logits.shape, dtype=torch.bool)
        chosen[d.token_index, d.expert_index] = True
        chosen[~chosen.any(-1)] = True  # rows without slots do not matter; keep them NaN-free
        probs = torch.softmax(ref_logits.masked_fill(~chosen, float("-inf")), dim=-1)
    elif gate == "restricted_sigmoid":
        chosen = torch.zeros(ref_logits.shape, dtype=torch.bool)
        chosen[d.token_index, d.expert_index] = True
        sig = torch.sigmoid(ref_logits) * chosen
        probs = sig / sig.sum(-1, keepdim=True).clamp_min(1e-300)
    else:
        probs = torch.softmax(ref_logits, dim=-1)
    (probs[d.token_index, d.expert_index] * w).sum().backward()
    torch.testing.assert_close(logits.grad.double().reshape(-1, num_experts), ref_logits.grad, atol=1e-5, rtol=1e-4)


def test_gradient_finite_with_zero_expert_tokens() -> None:
    # L=4, E=4, k=1 -> C=1: every expert picks token 1 (largest logit in every column)
    logits = torch.tensor([[[0.3, 0.1, -0.2, 0.0], [2.0, 1.5, 1.0, 3.0], [-1.0, 0.2, 0.4, 0.1], [0.5, -0.5, 0.9, 1.0]]])
    logits.requires_grad_(True)
    d = expert_choice(logits, 1)
    assert d.token_index.tolist() == [1, 1, 1, 1]
    assert d.experts_per_token().tolist() == [0, 4, 0, 0]
    assert float(d.gate.detach().sum()) == pytest.approx(1.0)
    (d.gate * torch.arange(1.0, 5.0)).sum().backward()
    assert bool(torch.isfinite(logits.grad).all())
    assert torch.equal(logits.grad[0, [0, 2, 3]], torch.zeros(3, 4))
    assert float(logits.grad[0, 1].abs().sum()) > 0  # token 1's gates depend on its logits


@given(ec_cases(), st.floats(1e-4, 1.0))
def test_z_loss_added(case, coef: float) -> None:
    logits, k = case
    num_experts = logits.shape[-1]
    assert float(expert_choice(logits, k).aux_loss) == 0.0
    d = expert_choice(logits, k, z_loss_coef=coef)
    ref = coef * torch.logsumexp(logits.reshape(-1, num_experts).double(), dim=-1).square().mean()
    assert float(d.aux_loss) == pytest.approx(float(ref), rel=1e-5)


def test_per_sample_capacity_example() -> None:
    # L=8, E=4: k=(1, 4) -> C=(2, 8); every expert holds 10 slots, sequence 1 fully taken by all
    logits = distinct_logits(2, 8, 4, seed=3)
    d = expert_choice(logits, torch.tensor([1, 4]))
    assert d.counts.tolist() == [10, 10, 10, 10]
    per_token = d.experts_per_token().view(2, 8)
    assert per_token[1].tolist() == [4] * 8
    assert int(per_token[0].sum()) == 8


# ---------------------------------------------------------------------------------------------
# "restricted_sigmoid": EC-DLM's sparse sigmoid gate, g = σ(l_{t,e}) / Σ_{e'∈S(t)} σ(l_{t,e'})


@st.composite
def sigmoid_cases(draw: st.DrawFn) -> dict:
    """Continuous logits (no ties by logit or by softmax score), per-sample or shared k, optional padding."""
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, 16))
    num_experts = draw(st.integers(1, 10))
    seed = draw(st.integers(0, 2**31 - 8))
    logits = torch.stack([generic_logits(length, num_experts, seed + b) for b in range(batch)])
    ks = [draw(st.integers(1, num_experts)) for _ in range(batch)]
    k = torch.tensor(ks, dtype=torch.int64) if draw(st.booleans()) else ks[0]
    valid = None
    if draw(st.booleans()):
        valid = torch.tensor(draw(st.lists(st.booleans(), min_size=batch * length, max_size=batch * length)))
        valid = valid.view(batch, length)
    return {
        "logits": logits,
        "k": k,
        "valid": valid,
        "pool": draw(st.sampled_from(["sequence", "batch"])),
        "select": draw(st.sampled_from(["logit", "score"])),
    }


def sigmoid_gate_reference(case: dict) -> dict[tuple[int, int], float]:
    """Step by step: each expert picks its pool's top-C valid tokens, then a loop over the tokens
    normalises the sigmoids of the experts that chose each one. {(token, expert): gate}."""
    logits = case["logits"].double()
    batch, length, num_experts = logits.shape
    ks = k_list(case["k"], batch)
    valid = case["valid"] if case["valid"] is not None else torch.ones(batch, length, dtype=torch.bool)
    flat = logits.reshape(-1, num_experts)
    rank = (flat if case["select"] == "logit" else torch.softmax(flat, dim=-1)).tolist()
    is_valid = valid.reshape(-1).tolist()
    rows = [[t for t in range(b * length, (b + 1) * length) if is_valid[t]] for b in range(batch)]
    if case["pool"] == "sequence":  # one pool per row, budget n_b·k_b
        pools = [(tokens, len(tokens) * ks[b]) for b, tokens in enumerate(rows)]
    else:  # one pool: every row brings n_b·k_b to the shared budget
        pools = [([t for tokens in rows for t in tokens], sum(len(tokens) * ks[b] for b, tokens in enumerate(rows)))]
    chosen: dict[int, list[int]] = {t: [] for t in range(batch * length)}
    for tokens, budget in pools:
        n = len(tokens)
        cap = min(max(budget // num_experts, 1), n)
        for e in range(num_experts):
            for t in sorted(tokens, key=lambda t, e=e: -rank[t][e])[:cap]:
                chosen[t].append(e)
    gates = {}
    for t, experts in chosen.items():  # tokens with no expert get no slot (zero gate)
        if not experts:
            continue
        sig = {e: 1.0 / (1.0 + math.exp(-float(flat[t, e]))) for e in experts}
        total = sum(sig.values())
        for e in experts:
            gates[(t, e)] = sig[e] / total
    return gates


@given(sigmoid_cases())
def test_restricted_sigmoid_gates_match_step_by_step_reference(case: dict) -> None:
    d = expert_choice(
        case["logits"], case["k"], pool=case["pool"], select=case["select"], gate="restricted_sigmoid",
        valid=case["valid"],
    )  # fmt: skip
    want = sigmoid_gate_reference(case)
    got = {(t, e): g for (t, e), g in zip(slots(d), d.gate.tolist(), strict=True)}
    assert set(got) == set(want)
    assert d.gate.dtype == torch.float32
    for key, g in got.items():
        assert g == pytest.approx(want[key], rel=1e-6, abs=1e-7), key
    # the same slots as the softmax gates: only the gate values differ
    soft = expert_choice(case["logits"], case["k"], pool=case["pool"], select=case["select"], valid=case["valid"])
    assert torch.equal(soft.token_index, d.token_index) and torch.equal(soft.expert_index, d.expert_index)
    # every chosen token's gates sum to 1; unchosen tokens get zero routed output
    num_tokens = d.num_tokens
    sums = torch.zeros(num_tokens).index_add_(0, d.token_index, d.gate)
    routed = torch.bincount(d.token_index, minlength=num_tokens) > 0
    torch.testing.assert_close(sums[routed], torch.ones(int(routed.sum())))
    out = d.combine(torch.ones(d.num_slots, 2))
    assert torch.equal(out[~routed], torch.zeros(int((~routed).sum()), 2))


def test_restricted_sigmoid_example_with_zero_expert_tokens_and_gradient() -> None:
    # L=4, E=4, k=1 -> C=1: every expert picks token 1 (largest logit in every column); tokens 0, 2, 3 get none
    logits = torch.tensor([[[0.3, 0.1, -0.2, 0.0], [2.0, 1.5, 1.0, 3.0], [-1.0, 0.2, 0.4, 0.1], [0.5, -0.5, 0.9, 1.0]]])
    logits.requires_grad_(True)
    d = expert_choice(logits, 1, gate="restricted_sigmoid")
    assert d.token_index.tolist() == [1, 1, 1, 1] and d.expert_index.tolist() == [0, 1, 2, 3]
    sig = [1 / (1 + math.exp(-x)) for x in (2.0, 1.5, 1.0, 3.0)]
    assert d.gate.tolist() == pytest.approx([s / sum(sig) for s in sig], rel=1e-6)
    assert d.experts_per_token().tolist() == [0, 4, 0, 0]
    (d.gate * torch.arange(1.0, 5.0)).sum().backward()
    assert bool(torch.isfinite(logits.grad).all())
    assert torch.equal(logits.grad[0, [0, 2, 3]], torch.zeros(3, 4))
    # d/dl_j of Σ_e w_e σ_e / Σσ = σ_j (1 − σ_j) (w_j − Σ_e w_e g_e) / Σσ
    w, g = [1.0, 2.0, 3.0, 4.0], [s / sum(sig) for s in sig]
    mean_w = sum(a * b for a, b in zip(w, g, strict=True))
    ref = [s * (1 - s) * (wj - mean_w) / sum(sig) for s, wj in zip(sig, w, strict=True)]
    assert logits.grad[0, 1].tolist() == pytest.approx(ref, rel=1e-5, abs=1e-7)


def test_restricted_sigmoid_per_sample_capacity_example() -> None:
    # L=8, E=4: k=(1, 4) -> C=(2, 8); row 1 is taken by all 4 experts: its gates are σ(l)/Σ_e σ(l) over all E
    logits = distinct_logits(2, 8, 4, seed=3)
    d = expert_choice(logits, torch.tensor([1, 4]), gate="restricted_sigmoid")
    assert d.counts.tolist() == [10, 10, 10, 10]
    row1 = {(t - 8, e): g for (t, e), g in zip(slots(d), d.gate.tolist(), strict=True) if t >= 8}
    sig = torch.sigmoid(logits[1].double())
    want = sig / sig.sum(-1, keepdim=True)
    assert len(row1) == 32
    for (t, e), g in row1.items():
        assert g == pytest.approx(float(want[t, e]), rel=1e-6)


class _OneMemberPool:
    rank, size = 0, 1

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x


@given(sigmoid_cases())
def test_restricted_sigmoid_pooled_equals_batch_pool(case: dict) -> None:
    kw = dict(select=case["select"], gate="restricted_sigmoid", valid=case["valid"])
    pooled = expert_choice_pooled(case["logits"], case["k"], _OneMemberPool(), **kw)
    batch = expert_choice(case["logits"], case["k"], pool="batch", **kw)
    assert torch.equal(pooled.token_index, batch.token_index) and torch.equal(pooled.expert_index, batch.expert_index)
    torch.testing.assert_close(pooled.gate, batch.gate, rtol=0, atol=0)


def test_unknown_gate_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"gate must be one of \['restricted', 'full', 'restricted_sigmoid'\]"):
        expert_choice(distinct_logits(1, 4, 2, seed=0), 1, gate="sigmoid")
