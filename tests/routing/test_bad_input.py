"""Bad inputs raise ValueError naming the parameter and the offending value."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dlmoe.config import BlockRoutingConfig, RouterConfig
from dlmoe.routing import ExpertChoiceRouter, block_route, expert_choice, token_choice, unique_experts_per_block
from dlmoe.routing.schedules import dynamic_k, expected_k, schedule_value

E = 6
LOGITS = torch.randn(2, 5, E)
SCORES = torch.rand(2, 5, E)
R = torch.tensor([0.2, 0.7])

Case = tuple[str, Callable[[], object], str]

CASES: list[Case] = [
    # k out of range
    ("tc_k0", lambda: token_choice(LOGITS, 0), r"\bk\b.*\b0\b"),
    ("tc_k_neg", lambda: token_choice(LOGITS, -2), r"\bk\b.*-2"),
    ("tc_k_gt_E", lambda: token_choice(LOGITS, E + 1), rf"\bk\b.*\b{E + 1}\b"),
    ("tc_k_float", lambda: token_choice(LOGITS, 2.0), r"\bk\b.*2\.0"),
    ("ec_k0", lambda: expert_choice(LOGITS, 0), r"\bk\b.*\b0\b"),
    ("ec_k_gt_E", lambda: expert_choice(LOGITS, E + 3), rf"\bk\b.*\b{E + 3}\b"),
    ("ec_k_tensor_0", lambda: expert_choice(LOGITS, torch.tensor([2, 0])), r"\bk\b.*\[2, 0\]"),
    ("ec_k_tensor_gt_E", lambda: expert_choice(LOGITS, torch.tensor([E + 1, 1])), rf"\bk\b.*\[{E + 1}, 1\]"),
    ("ec_k_tensor_shape", lambda: expert_choice(LOGITS, torch.tensor([1, 2, 3])), r"\bk\b.*\(3,\)"),
    ("ec_k_tensor_float", lambda: expert_choice(LOGITS, torch.tensor([1.0, 2.0])), r"\bk\b.*float"),
    ("block_k0", lambda: block_route(SCORES, 0, guard=2), r"\bk\b.*\b0\b"),
    ("block_k_gt_E", lambda: block_route(SCORES, E + 1, guard=2), rf"\bk\b.*\b{E + 1}\b"),
    # capacity factor
    ("tc_cf0", lambda: token_choice(LOGITS, 2, capacity_factor=0.0), r"capacity_factor.*\b0\.0\b"),
    ("tc_cf_neg", lambda: token_choice(LOGITS, 2, capacity_factor=-1.5), r"capacity_factor.*-1\.5"),
    ("cfg_cf0", lambda: RouterConfig(capacity_factor=0.0), r"capacity_factor.*\b0\.0\b"),
    # schedules
    ("sched_unknown", lambda: dynamic_k(R, "quadratic", 2, 4), r"schedule.*'quadratic'"),
    ("sched_unknown_ek", lambda: expected_k("quadratic", 2, 4), r"schedule.*'quadratic'"),
    ("sigma0", lambda: dynamic_k(R, "gaussian", 2, 4, sigma=0.0), r"sigma.*\b0\.0\b"),
    ("sigma_neg", lambda: schedule_value(R, "gaussian_reverse", sigma=-0.3), r"sigma.*-0\.3"),
    ("sigma_neg_ek", lambda: expected_k("gaussian", 2, 4, sigma=-1.0), r"sigma.*-1\.0"),
    ("kmin_gt_kmax", lambda: dynamic_k(R, "linear", 5, 3), r"k_min.*5.*k_max.*3"),
    ("kmin_gt_kmax_ek", lambda: expected_k("linear", 9, 8), r"k_min.*9.*k_max.*8"),
    ("kmin0", lambda: dynamic_k(R, "linear", 0, 3), r"k_min.*\b0\b"),
    ("r_above_1", lambda: dynamic_k(torch.tensor([0.5, 1.5]), "linear", 2, 4), r"mask ratio.*1\.5"),
    ("r_below_0", lambda: dynamic_k(torch.tensor([-0.25, 0.5]), "linear", 2, 4), r"mask ratio.*-0\.25"),
    ("r_nan", lambda: dynamic_k(torch.tensor([float("nan")]), "linear", 2, 4), r"mask ratio.*nan"),
    ("r_2d", lambda: dynamic_k(torch.rand(2, 3), "linear", 2, 4), r"mask ratio.*\(2, 3\)"),
    ("r_int", lambda: dynamic_k(torch.tensor([0, 1]), "linear", 2, 4), r"mask ratio.*int64"),
    # block routing
    ("block_size0", lambda: block_route(SCORES, 2, block_size=0, guard=2), r"block_size.*\b0\b"),
    ("block_size_neg", lambda: block_route(SCORES, 2, block_size=-4, guard=2), r"block_size.*-4"),
    ("ueb_block_size0", lambda: unique_experts_per_block(token_choice(LOGITS, 2), 0), r"block_size.*\b0\b"),
    ("cfg_block_size0", lambda: BlockRoutingConfig(block_size=0), r"block_size.*\b0\b"),
    ("top_p0", lambda: block_route(SCORES, 2, top_p=0.0, guard=2), r"top_p.*\b0\.0\b"),
    ("top_p_neg", lambda: block_route(SCORES, 2, top_p=-0.5, guard=2), r"top_p.*-0\.5"),
    ("top_p_gt1", lambda: block_route(SCORES, 2, top_p=1.25, guard=2), r"top_p.*1\.25"),
    ("cfg_top_p_gt1", lambda: BlockRoutingConfig(top_p=1.5), r"top_p.*1\.5"),
    ("guard_gt_E", lambda: block_route(SCORES, 2, guard=E + 1), rf"guard.*\b{E + 1}\b"),
    ("guard0", lambda: block_route(SCORES, 2, guard=0), r"guard.*\b0\b"),
    ("cfg_guard_gt_E", lambda: RouterConfig(num_experts=4, block=BlockRoutingConfig(guard=5)), r"guard.*\b5\b"),
    # input rank / dtype
    ("tc_2d", lambda: token_choice(torch.randn(5, E), 2), r"logits.*\(5, 6\)"),
    ("ec_2d", lambda: expert_choice(torch.randn(5, E), 2), r"logits.*\(5, 6\)"),
    ("block_2d", lambda: block_route(torch.rand(5, E), 2, guard=2), r"scores.*\(5, 6\)"),
    ("tc_4d", lambda: token_choice(torch.randn(1, 2, 5, E), 2), r"logits.*\(1, 2, 5, 6\)"),
    ("tc_int", lambda: token_choice(torch.ones(2, 5, E, dtype=torch.int64), 2), r"logits.*int64"),
    ("ec_int", lambda: expert_choice(torch.ones(2, 5, E, dtype=torch.int32), 2), r"logits.*int32"),
    ("block_int", lambda: block_route(torch.ones(2, 5, E, dtype=torch.int64), 2, guard=2), r"scores.*int64"),
    ("tc_not_tensor", lambda: token_choice([[[0.0, 1.0]]], 1), r"logits.*list"),
    ("tc_empty", lambda: token_choice(torch.randn(0, 5, E), 2), r"logits.*\(0, 5, 6\)"),
    # other token-choice knobs
    ("bias_shape", lambda: token_choice(LOGITS, 2, expert_bias=torch.zeros(E + 1)), r"expert_bias.*\(7,\)"),
    ("group_divides", lambda: token_choice(LOGITS, 2, n_group=4, topk_group=1), r"n_group.*\b4\b"),
    ("group_alone", lambda: token_choice(LOGITS, 2, n_group=2), r"n_group.*topk_group.*None"),
    ("topk_group_gt", lambda: token_choice(LOGITS, 2, n_group=2, topk_group=3), r"topk_group.*\b3\b"),
    ("rsf0", lambda: token_choice(LOGITS, 2, routed_scaling_factor=0.0), r"routed_scaling_factor.*\b0\.0\b"),
    ("ec_pool", lambda: expert_choice(LOGITS, 2, pool="global"), r"pool.*'global'"),
    ("ec_select", lambda: expert_choice(LOGITS, 2, select="prob"), r"select.*'prob'"),
    ("ec_gate", lambda: expert_choice(LOGITS, 2, gate="sparse"), r"gate.*'sparse'"),
    ("tc_score", lambda: token_choice(LOGITS, 2, score="tanh"), r"score.*'tanh'"),
    # RouterConfig
    ("cfg_kind", lambda: RouterConfig(kind="hash"), r"kind.*'hash'"),
    ("cfg_score", lambda: RouterConfig(score="relu"), r"score.*'relu'"),
    ("cfg_k_gt_E", lambda: RouterConfig(num_experts=4, num_experts_per_tok=5), r"num_experts_per_tok.*\b5\b"),
    ("cfg_n_group", lambda: RouterConfig(num_experts=8, n_group=3, topk_group=1), r"n_group.*\b3\b"),
    ("cfg_schedule_kind", lambda: RouterConfig(capacity_schedule="linear", k_min=1, k_max=4), r"capacity_schedule"),
    (
        "cfg_schedule_unknown",
        lambda: RouterConfig(kind="expert_choice", capacity_schedule="zigzag", k_min=1, k_max=4),
        r"capacity_schedule.*'zigzag'",
    ),
    (
        "cfg_schedule_no_k",
        lambda: RouterConfig(kind="expert_choice", capacity_schedule="linear", k_min=1),
        r"capacity_schedule.*k_max",
    ),
    (
        "cfg_schedule_kmin_gt_kmax",
        lambda: RouterConfig(kind="expert_choice", capacity_schedule="linear", k_min=4, k_max=2),
        r"k_min.*4.*2",
    ),
    (
        "cfg_schedule_kmax_gt_E",
        lambda: RouterConfig(kind="expert_choice", num_experts=8, capacity_schedule="linear", k_min=1, k_max=9),
        r"k_max.*\b9\b",
    ),
    (
        "cfg_schedule_sigma",
        lambda: RouterConfig(kind="expert_choice", capacity_schedule="gaussian", k_min=1, k_max=4, schedule_sigma=0.0),
        r"sigma.*\b0\.0\b",
    ),
    (  # block routing is allowed for both kinds; the guard bound holds for both
        "cfg_block_ec_guard_gt_E",
        lambda: RouterConfig(kind="expert_choice", num_experts=4, block=BlockRoutingConfig(guard=5)),
        r"guard.*\b5\b",
    ),
]


@pytest.mark.parametrize(("fn", "match"), [pytest.param(fn, m, id=name) for name, fn, m in CASES])
def test_bad_input_raises_value_error(fn: Callable[[], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fn()


def _ec_router_with_schedule() -> ExpertChoiceRouter:
    cfg = RouterConfig(kind="expert_choice", num_experts=E, capacity_schedule="linear", k_min=1, k_max=4)
    return ExpertChoiceRouter(cfg, dim=8)


@pytest.mark.parametrize(
    ("mask_ratio", "match"),
    [
        (torch.tensor([0.5, 1.25]), r"mask ratio.*1\.25"),
        (torch.tensor([-0.5, 0.5]), r"mask ratio.*-0\.5"),
        (torch.tensor([0.5, 0.5, 0.5]), r"mask_ratio.*\(3,\)"),
        (torch.tensor([[0.5], [0.5]]), r"mask_ratio.*\(2, 1\)"),
        (torch.tensor([0, 1]), r"mask_ratio.*int64"),
    ],
)
def test_ec_router_bad_mask_ratio(mask_ratio: torch.Tensor, match: str) -> None:
    router = _ec_router_with_schedule()
    with pytest.raises(ValueError, match=match):
        router(torch.randn(2, 5, 8), mask_ratio=mask_ratio)


def test_ec_router_missing_mask_ratio() -> None:
    router = _ec_router_with_schedule()
    with pytest.raises(ValueError, match=r"mask_ratio.*capacity_schedule|capacity_schedule.*mask_ratio"):
        router(torch.randn(2, 5, 8))


@pytest.mark.parametrize(
    ("make", "value"),
    [
        (lambda: RouterConfig(kind="token_choice", capacity_schedule="cosine", k_min=1, k_max=4), "cosine"),
        (lambda: RouterConfig(kind="expert_choice", capacity_schedule="linear", k_max=4), "None"),
        (lambda: RouterConfig(kind="expert_choice", num_experts=4, block=BlockRoutingConfig(guard=5)), "5"),
    ],
    ids=["schedule_with_token_choice", "schedule_without_k_min", "block_guard_with_expert_choice"],
)
def test_router_config_messages_name_the_value(make: Callable[[], object], value: str) -> None:
    # regression: these messages named the field but not the offending value
    with pytest.raises(ValueError) as info:
        make()
    assert value in str(info.value)
