"""RoutingContext: per-forward padding, decoding blocks, block routing and EC capacity, through the routers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dlmoe.config import BlockRoutingConfig, RouterConfig
from dlmoe.routing import (
    ExpertChoiceRouter,
    RoutingContext,
    TokenChoiceRouter,
    block_expert_choice,
    block_route,
    build_router,
    expert_choice,
    token_choice,
)
from dlmoe.routing.schedules import dynamic_k
from dlmoe.routing.token_choice import router_scores
from tests.routing.helpers import assert_same_slots, row_slots

DIM, E = 16, 6


def make_x(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, length, DIM, generator=torch.Generator().manual_seed(seed))


def tc_router(**overrides: object) -> TokenChoiceRouter:
    return TokenChoiceRouter(RouterConfig(num_experts=E, num_experts_per_tok=2, **overrides), DIM)


def ec_router(**overrides: object) -> ExpertChoiceRouter:
    return ExpertChoiceRouter(
        RouterConfig(kind="expert_choice", num_experts=E, num_experts_per_tok=2, **overrides), DIM
    )


def same_dispatch(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("token_index", "expert_index", "gate", "counts"))


VALID = torch.tensor([[False, False, True, True, True], [True, True, True, True, True]])
IDS = torch.tensor([-1, -1, 0, 0, 1])
BLOCK = BlockRoutingConfig(block_size=2, top_p=0.6, guard=2)


@pytest.mark.parametrize("make", [tc_router, ec_router], ids=["token_choice", "expert_choice"])
def test_empty_context_routes_as_none(make: Callable[[], object]) -> None:
    router = make()
    x = make_x(2, 5, seed=0)
    assert same_dispatch(router(x), router(x, None, RoutingContext()))


def test_token_choice_router_passes_valid() -> None:
    router = tc_router(capacity_factor=1.0)
    x = make_x(2, 5, seed=1)
    d = router(x, context=RoutingContext(valid=VALID))
    assert same_dispatch(d, token_choice(router.logits(x), 2, capacity_factor=1.0, valid=VALID))
    assert d.valid is VALID


def test_token_choice_router_block_from_context_or_attribute() -> None:
    router = tc_router()
    x = make_x(2, 5, seed=2)
    ref = block_route(router_scores(router.logits(x), "softmax"), 2, block_ids=IDS, valid=VALID, top_p=0.6, guard=2)
    d = router(x, context=RoutingContext(valid=VALID, block_ids=IDS, block=BLOCK))
    assert same_dispatch(d, ref) and torch.equal(d.coreset_mask, ref.coreset_mask)
    assert router(x).coreset_mask is None  # the context changed one forward only
    router.block = BLOCK  # switched on after building: block_ids from the context, default blocks without
    assert same_dispatch(router(x, context=RoutingContext(valid=VALID, block_ids=IDS)), ref)
    default = block_route(router_scores(router.logits(x), "softmax"), 2, block_size=2, top_p=0.6, guard=2)
    assert same_dispatch(router(x), default)


def test_token_choice_router_refuses_capacity_override() -> None:
    with pytest.raises(ValueError, match="experts_per_token"):
        tc_router()(make_x(2, 5, seed=3), context=RoutingContext(experts_per_token=torch.tensor([1, 2])))


def test_expert_bias_counts_valid_tokens_only() -> None:
    router = tc_router(expert_bias=True)
    router.train()
    x = make_x(2, 5, seed=4)
    d = router(x, context=RoutingContext(valid=VALID))
    assert float(router.tokens_per_expert.sum()) == int(VALID.sum()) * 2
    torch.testing.assert_close(router.tokens_per_expert, d.requested_counts.float())


@given(st.integers(1, 3), st.integers(1, 16), st.integers(1, 8), st.data())
def test_ec_capacity_override(batch: int, length: int, num_experts: int, data: st.DataObject) -> None:
    k_b = torch.tensor([data.draw(st.integers(1, num_experts)) for _ in range(batch)], dtype=torch.int64)
    cfg = RouterConfig(
        kind="expert_choice",
        num_experts=num_experts,
        num_experts_per_tok=1,
        capacity_schedule="linear",
        k_min=1,
        k_max=1,
    )
    router = ExpertChoiceRouter(cfg, DIM)
    x = make_x(batch, length, data.draw(st.integers(0, 2**31 - 1)))
    d = router(x, context=RoutingContext(experts_per_token=k_b))  # the override needs no mask_ratio
    rows = d.token_index // length
    for e in range(num_experts):
        got = torch.bincount(rows[d.expert_index == e], minlength=batch).tolist()
        assert got == [max(length * int(k) // num_experts, 1) for k in k_b]
    # with padding, n_b valid tokens replace L
    valid = torch.rand(batch, length, generator=torch.Generator().manual_seed(batch * length)) < 0.6
    d = router(x, context=RoutingContext(experts_per_token=k_b, valid=valid))
    rows = d.token_index // length
    n_b = valid.sum(1).tolist()
    for e in range(num_experts):
        got = torch.bincount(rows[d.expert_index == e], minlength=batch).tolist()
        assert got == [min(max(n * int(k) // num_experts, 1), n) for n, k in zip(n_b, k_b, strict=True)]


def test_ec_router_k_precedence_with_block_routing() -> None:
    router = ec_router(capacity_schedule="linear", k_min=1, k_max=E)
    router.block = BLOCK
    x = make_x(2, 5, seed=5)
    logits = router.logits(x)
    r = torch.tensor([0.1, 0.9])
    kw = dict(block_size=2, top_p=0.6, guard=2)
    override = torch.tensor([3, 1])
    d = router(x, r, RoutingContext(experts_per_token=override))
    assert same_dispatch(d, block_expert_choice(logits, override, **kw))  # override first
    d = router(x, r)
    assert same_dispatch(d, block_expert_choice(logits, dynamic_k(r, "linear", 1, E), **kw))  # then the schedule
    static = ec_router()
    static.block = BLOCK
    assert same_dispatch(static(x), block_expert_choice(static.logits(x), 2, **kw))  # then the static k


def test_ec_router_block_from_context() -> None:
    router = ec_router()
    x = make_x(2, 5, seed=6)
    ctx = RoutingContext(valid=VALID, block_ids=IDS, block=BLOCK, experts_per_token=torch.tensor([2, 4]))
    d = router(x, context=ctx)
    ref = block_expert_choice(router.logits(x), torch.tensor([2, 4]), block_ids=IDS, valid=VALID, top_p=0.6, guard=2)
    assert same_dispatch(d, ref) and torch.equal(d.coreset_mask, ref.coreset_mask)
    assert not d.equal_counts
    assert router(x).coreset_mask is None and router(x).equal_counts


def test_ec_router_with_block_in_config_if_allowed() -> None:
    try:
        cfg = RouterConfig(kind="expert_choice", num_experts=E, num_experts_per_tok=2, block=BLOCK)
    except ValueError:
        pytest.skip("this RouterConfig still refuses block routing for expert choice")
    router = build_router(cfg, DIM)
    x = make_x(2, 5, seed=7)
    assert same_dispatch(router(x), block_expert_choice(router.logits(x), 2, block_size=2, top_p=0.6, guard=2))


def test_router_padding_invariance() -> None:
    # a row alone vs left-padded in a batch, through the router modules (EC, TC, both block routings)
    x_alone = make_x(1, 3, seed=8)
    x = torch.cat([torch.cat([make_x(1, 2, seed=9), x_alone], 1), make_x(1, 5, seed=10)])
    ids = torch.tensor([0, 0, 0, 1, 1])
    for router in (ec_router(), tc_router()):
        for block in (None, BLOCK):
            padded = router(x, context=RoutingContext(valid=VALID, block_ids=ids, block=block))
            alone = router(x_alone, context=RoutingContext(block_ids=ids[2:], block=block))
            assert_same_slots(row_slots(padded, 0, 2), row_slots(alone), f"{type(router).__name__} {block}")


# ---------------------------------------------------------------------------------------------
# bad input

LOGITS = torch.randn(2, 5, E)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: RoutingContext(valid=torch.ones(2, 5)), r"context\.valid.*bool.*float32"),
        (lambda: RoutingContext(valid=torch.ones(10, dtype=torch.bool)), r"context\.valid.*\(10,\)"),
        (lambda: RoutingContext(block_ids=torch.tensor([0.0, 1.0])), r"context\.block_ids.*float32"),
        (lambda: RoutingContext(block_ids=torch.tensor([0, 2, 1])), r"context\.block_ids.*non-decreasing.*\[0, 2, 1\]"),
        (lambda: RoutingContext(block_ids=torch.zeros(2, 3, dtype=torch.int64)), r"context\.block_ids.*\(2, 3\)"),
        (lambda: RoutingContext(experts_per_token=torch.tensor([1.0])), r"context\.experts_per_token.*float32"),
        (lambda: RoutingContext(experts_per_token=torch.tensor([True])), r"context\.experts_per_token.*bool"),
        (lambda: RoutingContext(block={"block_size": 4}), r"context\.block.*dict"),
        (
            lambda: tc_router()(make_x(2, 5, 0), context=RoutingContext(valid=torch.ones(2, 4, dtype=torch.bool))),
            r"context\.valid.*\(2, 5\).*\(2, 4\)",
        ),
        (
            lambda: tc_router()(make_x(2, 5, 0), context=RoutingContext(block_ids=torch.arange(4))),
            r"context\.block_ids.*\(5,\).*\(4,\)",
        ),
        (
            lambda: ec_router()(make_x(2, 5, 0), context=RoutingContext(experts_per_token=torch.tensor([1, 2, 3]))),
            r"context\.experts_per_token.*\(2,\).*\(3,\)",
        ),
        (
            lambda: ec_router()(make_x(2, 5, 0), context=RoutingContext(experts_per_token=torch.tensor([0, 2]))),
            r"context\.experts_per_token.*\[1, 6\].*\[0, 2\]",
        ),
        (
            lambda: ec_router()(make_x(2, 5, 0), context=RoutingContext(experts_per_token=torch.tensor([2, 7]))),
            r"context\.experts_per_token.*\[2, 7\]",
        ),
        (lambda: ec_router()(make_x(2, 5, 0), context={"valid": None}), r"context.*RoutingContext.*dict"),
        (
            lambda: ec_router()(make_x(2, 5, 0), context=RoutingContext(block=BlockRoutingConfig(guard=E + 1))),
            rf"guard.*\b{E + 1}\b",
        ),
        (lambda: token_choice(LOGITS, 2, valid=torch.ones(2, 5, dtype=torch.int64)), r"valid.*bool.*int64"),
        (lambda: expert_choice(LOGITS, 2, valid=torch.ones(5, 2, dtype=torch.bool)), r"valid.*\(2, 5\).*\(5, 2\)"),
        (
            lambda: block_route(LOGITS.sigmoid(), 2, guard=2, block_ids=torch.tensor([1, 0, 0, 0, 0])),
            r"block_ids.*non-decreasing",
        ),
        (
            lambda: block_route(LOGITS.sigmoid(), 2, guard=2, block_ids=torch.zeros(4, dtype=torch.int64)),
            r"block_ids.*\(5,\).*\(4,\)",
        ),
        (lambda: block_expert_choice(LOGITS, 0, guard=2), r"\bk\b.*\b0\b"),
        (lambda: block_expert_choice(LOGITS, torch.tensor([1, E + 1]), guard=2), rf"\bk\b.*\[1, {E + 1}\]"),
        (lambda: block_expert_choice(LOGITS, 2, guard=E + 1), rf"guard.*\b{E + 1}\b"),
        (lambda: block_expert_choice(LOGITS, 2, guard=2, top_p=0.0), r"top_p.*\b0\.0\b"),
        (lambda: block_expert_choice(LOGITS, 2, guard=2, block_size=0), r"block_size.*\b0\b"),
        (lambda: block_expert_choice(LOGITS, 2, guard=2, select="prob"), r"select.*'prob'"),
        (lambda: block_expert_choice(LOGITS, 2, guard=2, gate="sparse"), r"gate.*'sparse'"),
        (lambda: block_expert_choice(LOGITS, 2, guard=2, valid=torch.ones(2, 5)), r"valid.*bool"),
        (
            lambda: block_expert_choice(LOGITS, 2, guard=2, block_ids=torch.tensor([0, 0, 1, 0, 1])),
            r"block_ids.*non-decreasing",
        ),
    ],
)
def test_bad_context_raises_value_error(make: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make()
