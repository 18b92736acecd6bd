"""EC-DLM's scaling factor: the Monte Carlo tables, and the MoE layer applying them.

The tables are checked against an independent estimate: numpy's own generator, a loop over k of
the textbook definition (the routed scores of each draw renormalised and their norm taken, no
cumulative sums), expert choice's random subset drawn as a real random permutation rather than
"the first k". Both estimates are means of n iid terms, so their difference has standard
deviation σ_k·√(1/n₁ + 1/n₂), with σ_k the per-draw spread of √S/‖p̂_k‖ (measured from the
reference draws). The tolerance is 5 of those: a false failure has probability < 1e-6 per k
(< 1e-4 over all the k checked, even treating them as independent), while the alternative
definition (k largest instead of a random k-subset) differs by more than ten of them.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from dlmoe.config import ModelConfig, MoEConfig, RouterConfig
from dlmoe.model import DlmoeConfig, DlmoeForDiffusionLM
from dlmoe.moe.layer import MoELayer
from dlmoe.routing import scaling
from dlmoe.routing.context import RoutingContext
from dlmoe.routing.scaling import NUM_DRAWS, ec_scaling_table, tc_scaling_factor

REFERENCE_DRAWS = 20_000
SIGMAS = 5.0


def reference(
    num_experts: int, num_shared: int, *, score: str = "softmax", renormalize: bool = True, largest: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(mean, per-draw std) of √S/‖p̂_k‖ for k = 1..E, from numpy's generator (not the module's)."""
    rng = np.random.default_rng(20240607)
    z = rng.standard_normal((REFERENCE_DRAWS, num_experts))
    if score == "softmax":
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p = p / p.sum(axis=1, keepdims=True)
    else:
        p = 1.0 / (1.0 + np.exp(-z))
    p = -np.sort(-p, axis=1) if largest else rng.permuted(p, axis=1)  # k largest, or a random k-subset
    means, stds = [], []
    for k in range(1, num_experts + 1):
        chosen = p[:, :k]
        if renormalize:
            chosen = chosen / chosen.sum(axis=1, keepdims=True)
        factor = math.sqrt(num_shared) / np.linalg.norm(chosen, axis=1)
        means.append(factor.mean())
        stds.append(factor.std())
    return np.array(means), np.array(stds)


def tolerance(std: np.ndarray) -> np.ndarray:
    return SIGMAS * std * math.sqrt(1 / NUM_DRAWS + 1 / REFERENCE_DRAWS)


# ---------------------------------------------------------------------------------------------
# the tables


@pytest.mark.parametrize(("num_experts", "num_shared"), [(64, 2), (16, 1)])
def test_ec_table_matches_an_independent_estimate(num_experts: int, num_shared: int) -> None:
    table = ec_scaling_table(num_experts, num_shared)
    assert table.shape == (num_experts + 1,) and table.dtype == torch.float32
    assert table[0].item() == 1.0
    assert table[1].item() == torch.tensor(math.sqrt(num_shared), dtype=torch.float32).item()  # p̂_1 = [1]
    assert bool((table[1:].diff() > 0).all()), "f must increase with the routed count"
    mean, std = reference(num_experts, num_shared, largest=False)
    gap = np.abs(table[1:].double().numpy() - mean)
    assert (gap <= tolerance(std) + 1e-6).all(), gap / tolerance(std)
    # EC-DLM takes a random k-subset (the first k of an unsorted draw), not the k largest
    mean_largest, _ = reference(num_experts, num_shared, largest=True)
    half = num_experts // 2
    assert abs(table[half].item() - mean_largest[half - 1]) > 10 * tolerance(std)[half - 1]


def test_ec_table_for_ec_dlm_settings_is_the_published_estimate() -> None:
    """E = 512, S = 2 (the OWT scripts): f(8) ≈ 3.0, f(20) ≈ 4.4, f(32) ≈ 5.4, f(64) ≈ 7.4."""
    table = ec_scaling_table(512, 2)
    for k, expected in {8: 3.0, 20: 4.4, 32: 5.4, 64: 7.4}.items():
        assert table[k].item() == pytest.approx(expected, abs=0.06)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_tc_factor_matches_an_independent_estimate(score: str, renormalize: bool) -> None:
    num_experts, num_shared = 16, 2
    mean, std = reference(num_experts, num_shared, score=score, renormalize=renormalize, largest=True)
    for k in (1, 3, 8, 16):
        factor = tc_scaling_factor(num_experts, k, num_shared, score, renormalize)
        assert isinstance(factor, float)
        assert abs(factor - mean[k - 1]) <= tolerance(std)[k - 1] + 1e-9, (k, factor, mean[k - 1])
    if renormalize:
        assert tc_scaling_factor(num_experts, 1, num_shared, score, renormalize) == math.sqrt(num_shared)


def test_estimates_are_deterministic_and_the_cache_cannot_be_mutated() -> None:
    first = ec_scaling_table(16, 2)
    first_tc = tc_scaling_factor(16, 4, 2, "sigmoid", False)
    first[3] = -1.0  # the caller's copy only
    again = ec_scaling_table(16, 2)
    assert again[3].item() > 0
    scaling.cache_clear()
    recomputed, recomputed_tc = ec_scaling_table(16, 2), tc_scaling_factor(16, 4, 2, "sigmoid", False)
    assert torch.equal(again, recomputed) and recomputed_tc == first_tc


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        ec_scaling_table(0, 1)
    with pytest.raises(ValueError, match="num_shared must be >= 1"):
        ec_scaling_table(8, 0)
    with pytest.raises(ValueError, match="k must be <= 8"):
        tc_scaling_factor(8, 9, 1)
    with pytest.raises(ValueError, match="score must be one of"):
        tc_scaling_factor(8, 2, 1, "relu")
    with pytest.raises(ValueError, match="renormalize must be a bool"):
        tc_scaling_factor(8, 2, 1, "softmax", 1)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# the config


def test_config_needs_shared_experts_and_refuses_a_second_scale() -> None:
    with pytest.raises(ValueError, match=r"moe\.router\.scaling_factor=true.*moe\.num_shared_experts=0"):
        MoEConfig(router=RouterConfig(scaling_factor=True), num_shared_experts=0)
    with pytest.raises(ValueError, match="routed_scaling_factor=2.5"):
        RouterConfig(scaling_factor=True, routed_scaling_factor=2.5)
    with pytest.raises(ValueError, match="gate='full'"):
        RouterConfig(kind="expert_choice", gate="full", scaling_factor=True)
    with pytest.raises(ValueError, match="scaling_factor must be a bool"):
        RouterConfig(scaling_factor=1)  # type: ignore[arg-type]
    assert MoEConfig(router={"scaling_factor": True}, num_shared_experts=1).router.scaling_factor


# ---------------------------------------------------------------------------------------------
# the layer

DIM, BATCH, LENGTH, EXPERTS = 16, 2, 12, 8


def layer_pair(**router: object) -> tuple[MoELayer, MoELayer]:
    """The same weights without and with the scaling factor (2 shared experts)."""
    torch.manual_seed(0)
    plain = MoELayer(MoEConfig(router=RouterConfig(**router), expert_hidden=8, num_shared_experts=2), DIM)
    scaled_config = MoEConfig(router=RouterConfig(**router, scaling_factor=True), expert_hidden=8, num_shared_experts=2)
    scaled = MoELayer(scaled_config, DIM)
    scaled.load_state_dict(plain.state_dict())
    return plain, scaled


def by_hand(layer: MoELayer, x: torch.Tensor, gate_S: torch.Tensor, context: RoutingContext | None) -> torch.Tensor:
    """What the layer computes from the unscaled dispatch with the gates replaced by `gate_S`."""
    dispatch = layer.router(x, None, context)
    x_ND = x.reshape(-1, DIM)
    y = layer.experts(dispatch.gather(x_ND), dispatch.counts, gate_S, equal_counts=dispatch.equal_counts)
    return (dispatch.combine(y, apply_gate=False) + layer.shared_experts(x_ND)).view_as(x)


@pytest.mark.parametrize("override", [False, True], ids=["static-k", "k-override"])
def test_expert_choice_layer_scales_each_token_by_f_of_its_count(override: bool) -> None:
    _, layer = layer_pair(kind="expert_choice", num_experts=EXPERTS, num_experts_per_tok=3)
    context = RoutingContext(experts_per_token=torch.tensor([1, 6])) if override else None
    x = torch.randn(BATCH, LENGTH, DIM, requires_grad=True)
    out, moe_out = layer(x, None, context)
    raw = layer.router(x, None, context)
    count_N = torch.bincount(raw.token_index, minlength=BATCH * LENGTH)
    assert len(set(count_N.tolist())) >= 3, "the test needs tokens with different routed counts"
    table = ec_scaling_table(EXPERTS, 2)
    expected_gate = torch.stack(
        [raw.gate[s] * table[count_N[raw.token_index[s]]] for s in range(raw.num_slots)]  # slot by slot
    )
    torch.testing.assert_close(moe_out.dispatch.gate, expected_gate, rtol=0, atol=0)
    torch.testing.assert_close(out, by_hand(layer, x, expected_gate, context), rtol=0, atol=0)
    out.square().sum().backward()  # the factor is a constant: gradients still reach the router
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("capacity_factor", [None, 0.5], ids=["dropless", "capacity"])
def test_token_choice_layer_scales_every_gate_by_one_constant(capacity_factor: float | None) -> None:
    plain, layer = layer_pair(
        kind="token_choice", num_experts=EXPERTS, num_experts_per_tok=2, capacity_factor=capacity_factor
    )
    x = torch.randn(BATCH, LENGTH, DIM)
    out, moe_out = layer(x)
    raw = layer.router(x)
    if capacity_factor is not None:
        assert raw.num_slots < BATCH * LENGTH * 2, "the capacity must drop slots for this test"
    constant = tc_scaling_factor(EXPERTS, 2, 2, "softmax", True)
    torch.testing.assert_close(moe_out.dispatch.gate, raw.gate * constant, rtol=0, atol=0)
    torch.testing.assert_close(out, by_hand(layer, x, raw.gate * constant, None), rtol=0, atol=0)
    assert not torch.allclose(out, plain(x)[0])


@pytest.mark.parametrize("kind", ["token_choice", "expert_choice"])
def test_block_routed_layers_scale_their_coreset_gates_the_same_way(kind: str) -> None:
    from dlmoe.config import BlockRoutingConfig

    block = BlockRoutingConfig(block_size=4, top_p=0.5, guard=2)
    score = {"score": "sigmoid"} if kind == "token_choice" else {}  # a token-choice option (refused for EC)
    _, layer = layer_pair(kind=kind, num_experts=EXPERTS, num_experts_per_tok=2, block=block, **score)
    x = torch.randn(BATCH, LENGTH, DIM)
    _, moe_out = layer(x)
    raw = layer.router(x)
    if kind == "token_choice":
        expected = raw.gate * tc_scaling_factor(EXPERTS, 2, 2, "sigmoid", True)
    else:
        count_N = torch.bincount(raw.token_index, minlength=BATCH * LENGTH)
        expected = raw.gate * ec_scaling_table(EXPERTS, 2)[count_N[raw.token_index]]
    torch.testing.assert_close(moe_out.dispatch.gate, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# save / load


def tiny_model_config(scaling_factor: bool) -> ModelConfig:
    router = RouterConfig(kind="expert_choice", num_experts=4, num_experts_per_tok=2, scaling_factor=scaling_factor)
    moe = MoEConfig(router=router, expert_hidden=16, num_shared_experts=2)
    return ModelConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, max_seq_len=16, moe=moe, mask_id=63)


def test_the_option_survives_save_and_load(tmp_path) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.manual_seed(0)
    config = tiny_model_config(True)
    model = DlmoeForDiffusionLM(DlmoeConfig.from_model_config(config)).eval()
    ids = torch.randint(0, 63, (2, 12))
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["moe"]["router"]["scaling_factor"] is True
    loaded = DlmoeForDiffusionLM.from_pretrained(tmp_path).eval()  # built on the meta device
    assert loaded.config.to_model_config() == config
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)


def test_a_config_saved_before_the_option_loads_without_it(tmp_path) -> None:
    os.environ["HF_HUB_OFFLINE"] = "1"
    DlmoeForDiffusionLM(DlmoeConfig.from_model_config(tiny_model_config(False))).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    del saved["moe"]["router"]["scaling_factor"]
    path.write_text(json.dumps(saved))
    loaded = DlmoeForDiffusionLM.from_pretrained(tmp_path)
    assert loaded.config.to_model_config().moe.router.scaling_factor is False


def test_exports_refuse_a_router_with_the_scaling_factor() -> None:
    from dlmoe.config import ModelConfig, MoEConfig, RouterConfig
    from dlmoe.model.convert import llada2_moe, llada_moe
    from dlmoe.model.convert.files import CheckpointError

    router = RouterConfig(num_experts=4, num_experts_per_tok=2, scaling_factor=True, renormalize=False)
    mc = ModelConfig(moe=MoEConfig(router=router, expert_hidden=8, num_shared_experts=1))
    for fmt in (llada_moe, llada2_moe):
        with pytest.raises(CheckpointError, match="router.scaling_factor"):
            fmt.check_exportable(mc)
