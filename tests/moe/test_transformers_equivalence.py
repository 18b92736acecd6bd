"""Equivalence with reference MoE blocks of `transformers` given the same weights.

(a) OLMoE (softmax top-k, no renormalisation) vs our token-choice MoELayer.
(b) DeepSeek-V3 group-limited sigmoid routing with a score-correction bias and a routed scaling
    factor vs `dlmoe.routing.token_choice`, and the full DeepseekV3MoE block (routed + one shared
    expert) vs our MoELayer.

Both transformers blocks store experts as `gate_up_proj` [E, 2F, D] (gate rows first, then up
rows; `is_concatenated=True` in `use_experts_implementation`) and `down_proj` [E, D, F] — the
layout of `dlmoe.moe.Experts` — which `test_expert_weight_layout_is_gate_then_up` verifies.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import DeepseekV3Config, OlmoeConfig
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE, DeepseekV3TopkRouter
from transformers.models.olmoe.modeling_olmoe import OlmoeModel, OlmoeSparseMoeBlock

from dlmoe.config import MoEConfig, RouterConfig
from dlmoe.moe.experts import BACKENDS
from dlmoe.moe.layer import MoELayer
from dlmoe.routing import Dispatch, token_choice

HIDDEN, OLMOE_INTERMEDIATE, OLMOE_EXPERTS, OLMOE_TOPK = 32, 16, 8, 2
DS_EXPERTS, DS_TOPK, DS_GROUPS, DS_TOPK_GROUP, DS_SCALE, DS_MOE_INTERMEDIATE = 16, 4, 4, 2, 2.5, 16
BATCH, LENGTH = 2, 12


# ---------------------------------------------------------------------------------------------
# helpers


def olmoe_config() -> OlmoeConfig:
    return OlmoeConfig(
        hidden_size=HIDDEN,
        intermediate_size=OLMOE_INTERMEDIATE,
        num_experts=OLMOE_EXPERTS,
        num_experts_per_tok=OLMOE_TOPK,
        norm_topk_prob=False,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
        pad_token_id=1,
        bos_token_id=None,
        eos_token_id=2,
    )


def deepseek_config() -> DeepseekV3Config:
    return DeepseekV3Config(
        hidden_size=HIDDEN,
        intermediate_size=64,
        moe_intermediate_size=DS_MOE_INTERMEDIATE,
        n_routed_experts=DS_EXPERTS,
        n_shared_experts=1,
        num_experts_per_tok=DS_TOPK,
        n_group=DS_GROUPS,
        topk_group=DS_TOPK_GROUP,
        norm_topk_prob=True,
        routed_scaling_factor=DS_SCALE,
        hidden_act="silu",
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        vocab_size=64,
    )


def init_(module: torch.nn.Module, gen_std: dict[str, float]) -> None:
    """Random weights (transformers' experts start as torch.empty, routers as zeros)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = next(v for k, v in gen_std.items() if k in name)
            p.normal_(std=std)


def olmoe_block(experts_implementation: str | None = "eager") -> OlmoeSparseMoeBlock:
    config = olmoe_config()
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    block = OlmoeSparseMoeBlock(config)
    init_(
        block,
        {
            "gate.weight": 1.0 / math.sqrt(HIDDEN),
            "gate_up_proj": 1.0 / math.sqrt(HIDDEN),
            "down_proj": 1.0 / math.sqrt(OLMOE_INTERMEDIATE),
        },
    )
    return block


def our_layer_from_olmoe(block: OlmoeSparseMoeBlock, backend: str = "auto") -> MoELayer:
    config = MoEConfig(
        router=RouterConfig(
            kind="token_choice",
            num_experts=OLMOE_EXPERTS,
            num_experts_per_tok=OLMOE_TOPK,
            score="softmax",
            renormalize=False,
            capacity_factor=None,
        ),
        expert_hidden=OLMOE_INTERMEDIATE,
        num_shared_experts=0,
        backend=backend,
    )
    layer = MoELayer(config, HIDDEN)
    with torch.no_grad():
        layer.router.weight.copy_(block.gate.weight)
        layer.experts.gate_up_proj.copy_(block.experts.gate_up_proj)
        layer.experts.down_proj.copy_(block.experts.down_proj)
    return layer


def deepseek_moe() -> DeepseekV3MoE:
    config = deepseek_config()
    config._experts_implementation = "eager"
    block = DeepseekV3MoE(config)
    init_(
        block,
        {
            "gate.weight": 1.0 / math.sqrt(HIDDEN),
            "experts.gate_up_proj": 1.0 / math.sqrt(HIDDEN),
            "experts.down_proj": 1.0 / math.sqrt(DS_MOE_INTERMEDIATE),
            "shared_experts.gate_proj": 1.0 / math.sqrt(HIDDEN),
            "shared_experts.up_proj": 1.0 / math.sqrt(HIDDEN),
            "shared_experts.down_proj": 1.0 / math.sqrt(DS_MOE_INTERMEDIATE),
        },
    )
    with torch.no_grad():  # large enough to change choices (checked in the router test)
        block.gate.e_score_correction_bias.copy_(0.2 * torch.randn(DS_EXPERTS))
    return block


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    assert actual.shape == expected.shape, what
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), what
    scale = max(e.abs().max().item(), 1e-6)
    err = (a - e).abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e} > {rtol:.1e} * {scale:.3e}"


def dense_gates(index_NK: torch.Tensor, weight_NK: torch.Tensor, num_experts: int) -> torch.Tensor:
    return torch.zeros(index_NK.shape[0], num_experts, dtype=weight_NK.dtype).scatter(1, index_NK, weight_NK)


def dispatch_dense_gates(dispatch: Dispatch, num_experts: int) -> torch.Tensor:
    out = torch.zeros(dispatch.num_tokens, num_experts, dtype=dispatch.gate.dtype)
    out[dispatch.token_index, dispatch.expert_index] = dispatch.gate.detach()
    return out


# ---------------------------------------------------------------------------------------------
# (a) OLMoE


def test_olmoe_standalone_block_defaults_to_eager_experts() -> None:
    """A bare config has no experts implementation: the block falls back to its eager loop.

    (A full `OlmoeModel` picks "grouped_mm" where torch has it — that path is tested below too.)
    """
    config = olmoe_config()
    assert config._experts_implementation is None
    sentinel = object()
    assert ALL_EXPERTS_FUNCTIONS.get_interface(None, sentinel) is sentinel
    assert ALL_EXPERTS_FUNCTIONS.get_interface("eager", sentinel) is sentinel
    assert "eager" not in ALL_EXPERTS_FUNCTIONS  # "eager" means the class's own forward

    default_block = olmoe_block(experts_implementation=None)
    assert default_block.experts.config._experts_implementation is None
    eager = olmoe_block("eager")
    eager.load_state_dict(default_block.state_dict())
    x = torch.randn(BATCH, LENGTH, HIDDEN)
    assert torch.equal(default_block(x), eager(x))


def test_olmoe_full_model_default_experts_implementation() -> None:
    """Documented for the record: models (not bare blocks) default to grouped_mm when available."""
    model = OlmoeModel(olmoe_config())
    assert model.config._experts_implementation in {"grouped_mm", "eager"}
    if hasattr(F, "grouped_mm"):
        assert model.config._experts_implementation == "grouped_mm"


def test_expert_weight_layout_is_gate_then_up() -> None:
    """transformers' fused gate_up_proj puts the SiLU-gated rows first, as dlmoe does."""
    block = olmoe_block()
    x = torch.randn(5, HIDDEN)
    w_gu, w_d = block.experts.gate_up_proj[3].detach(), block.experts.down_proj[3].detach()
    f = OLMOE_INTERMEDIATE
    gate_first = F.linear(F.silu(x @ w_gu[:f].T) * (x @ w_gu[f:].T), w_d)
    up_first = F.linear(F.silu(x @ w_gu[f:].T) * (x @ w_gu[:f].T), w_d)
    # route all 5 tokens to expert 3 with weight 1 through transformers' experts
    index = torch.full((5, 1), 3)
    theirs = block.experts(x, index, torch.ones(5, 1)).detach()
    torch.testing.assert_close(theirs, gate_first, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(theirs, up_first, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("experts_impl", ["eager", "grouped_mm", "batched_mm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_olmoe_block_fp32_forward_and_grads(backend: str, experts_impl: str) -> None:
    block = olmoe_block(experts_impl)
    layer = our_layer_from_olmoe(block, backend)
    x = torch.randn(BATCH, LENGTH, HIDDEN)
    upstream = torch.randn(BATCH, LENGTH, HIDDEN)

    x_theirs = x.clone().requires_grad_(True)
    theirs = block(x_theirs)
    x_ours = x.clone().requires_grad_(True)
    ours, moe_out = layer(x_ours)

    # same routing decision
    _, top_w, top_i = block.gate(x.reshape(-1, HIDDEN))
    ours_chosen = dispatch_dense_gates(moe_out.dispatch, OLMOE_EXPERTS) > 0
    assert torch.equal(ours_chosen, dense_gates(top_i, top_w, OLMOE_EXPERTS) > 0)
    torch.testing.assert_close(
        dispatch_dense_gates(moe_out.dispatch, OLMOE_EXPERTS), dense_gates(top_i, top_w.detach(), OLMOE_EXPERTS)
    )
    assert moe_out.dispatch.gate.sum().item() < BATCH * LENGTH - 1e-3  # no renormalisation: gates sum < 1

    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    (theirs * upstream).sum().backward()
    (ours * upstream).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.router.weight.grad, block.gate.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.experts.gate_up_proj.grad, block.experts.gate_up_proj.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.experts.down_proj.grad, block.experts.down_proj.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_olmoe_block_bf16(backend: str) -> None:
    """Theirs in bf16 weights; ours with the same (bf16-representable) fp32 weights under autocast."""
    block = olmoe_block("eager").to(torch.bfloat16)
    layer = our_layer_from_olmoe(block, backend)  # copies the bf16 values exactly into fp32
    with torch.no_grad():  # a decisive router, so bf16 logits (theirs) and fp32 logits (ours) pick alike
        block.gate.weight.mul_(4.0)
        layer.router.weight.mul_(4.0)
    x16 = torch.randn(BATCH, LENGTH, HIDDEN).to(torch.bfloat16)
    upstream = torch.randn(BATCH, LENGTH, HIDDEN)

    x_theirs = x16.clone().requires_grad_(True)
    theirs = block(x_theirs)
    x_ours = x16.float().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, moe_out = layer(x_ours)
    assert theirs.dtype == ours.dtype == torch.bfloat16

    _, top_w, top_i = block.gate(x16.reshape(-1, HIDDEN))
    ours_chosen = dispatch_dense_gates(moe_out.dispatch, OLMOE_EXPERTS) > 0
    assert torch.equal(ours_chosen, dense_gates(top_i, top_w, OLMOE_EXPERTS) > 0)
    assert_rel_close(ours.float(), theirs.float(), 3e-2, "output")
    (theirs.float() * upstream).sum().backward()
    (ours.float() * upstream).sum().backward()
    assert_rel_close(x_ours.grad, x_theirs.grad.float(), 5e-2, "grad x")


# ---------------------------------------------------------------------------------------------
# (b) DeepSeek-V3


def test_deepseek_v3_router_matches_token_choice() -> None:
    config = deepseek_config()
    router = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.normal_(std=1.0 / math.sqrt(HIDDEN))
        router.e_score_correction_bias.copy_(0.2 * torch.randn(DS_EXPERTS))
    bias = router.e_score_correction_bias
    x = torch.randn(4, 16, HIDDEN)
    n = x.shape[0] * x.shape[1]

    logits_theirs, weights_theirs, index_theirs = router(x)
    logits = (x.float() @ router.weight.float().T).view(4, 16, DS_EXPERTS)
    torch.testing.assert_close(logits.reshape(n, -1), logits_theirs)

    kwargs = dict(score="sigmoid", renormalize=True, n_group=DS_GROUPS, topk_group=DS_TOPK_GROUP)
    dispatch = token_choice(logits, DS_TOPK, expert_bias=bias, routed_scaling_factor=DS_SCALE, **kwargs)

    # the same experts per token (transformers' top-k is unsorted: compare as sets)
    ours_sets = [[] for _ in range(n)]
    for t, e in zip(dispatch.token_index.tolist(), dispatch.expert_index.tolist(), strict=True):
        ours_sets[t].append(e)
    assert [sorted(s) for s in ours_sets] == index_theirs.sort(-1).values.tolist()
    # the same gate per (token, expert): unbiased sigmoid scores, renormalised, × 2.5
    ours_dense = dispatch_dense_gates(dispatch, DS_EXPERTS)
    theirs_dense = dense_gates(index_theirs, weights_theirs.detach(), DS_EXPERTS)
    torch.testing.assert_close(ours_dense, theirs_dense, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours_dense.sum(-1), torch.full((n,), DS_SCALE))

    # the features under test matter for this draw: bias and group limit each change some choice
    no_bias = token_choice(logits, DS_TOPK, routed_scaling_factor=DS_SCALE, **kwargs)
    kwargs_no_group = dict(score="sigmoid", renormalize=True)
    no_group = token_choice(logits, DS_TOPK, expert_bias=bias, routed_scaling_factor=DS_SCALE, **kwargs_no_group)
    chosen = dispatch_dense_gates(dispatch, DS_EXPERTS) > 0
    assert not torch.equal(chosen, dispatch_dense_gates(no_bias, DS_EXPERTS) > 0)
    assert not torch.equal(chosen, dispatch_dense_gates(no_group, DS_EXPERTS) > 0)
    # every token's experts come from at most topk_group groups
    groups_used = chosen.view(n, DS_GROUPS, -1).any(-1).sum(-1)
    assert int(groups_used.max()) <= DS_TOPK_GROUP


def _our_layer_from_deepseek(block: DeepseekV3MoE, backend: str) -> MoELayer:
    config = MoEConfig(
        router=RouterConfig(
            kind="token_choice",
            num_experts=DS_EXPERTS,
            num_experts_per_tok=DS_TOPK,
            score="sigmoid",
            renormalize=True,
            capacity_factor=None,
            expert_bias=True,
            n_group=DS_GROUPS,
            topk_group=DS_TOPK_GROUP,
            routed_scaling_factor=DS_SCALE,
        ),
        expert_hidden=DS_MOE_INTERMEDIATE,
        num_shared_experts=1,
        backend=backend,
    )
    layer = MoELayer(config, HIDDEN)
    shared = block.shared_experts
    with torch.no_grad():
        layer.router.weight.copy_(block.gate.weight)
        layer.router.expert_bias.copy_(block.gate.e_score_correction_bias)
        layer.experts.gate_up_proj.copy_(block.experts.gate_up_proj)
        layer.experts.down_proj.copy_(block.experts.down_proj)
        layer.shared_experts.gate_up_proj.weight.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
        layer.shared_experts.down_proj.weight.copy_(shared.down_proj.weight)
    return layer


@pytest.mark.parametrize("backend", BACKENDS)
def test_deepseek_v3_moe_block_fp32(backend: str) -> None:
    block = deepseek_moe()
    layer = _our_layer_from_deepseek(block, backend).eval()  # eval: the bias counters stay untouched
    x = torch.randn(BATCH, LENGTH, HIDDEN)
    upstream = torch.randn(BATCH, LENGTH, HIDDEN)

    x_theirs = x.clone().requires_grad_(True)
    theirs = block(x_theirs)
    x_ours = x.clone().requires_grad_(True)
    ours, _ = layer(x_ours)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    (theirs * upstream).sum().backward()
    (ours * upstream).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.router.weight.grad, block.gate.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.experts.gate_up_proj.grad, block.experts.gate_up_proj.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.experts.down_proj.grad, block.experts.down_proj.grad, rtol=1e-5, atol=1e-5)
    shared = block.shared_experts
    torch.testing.assert_close(
        layer.shared_experts.gate_up_proj.weight.grad,
        torch.cat([shared.gate_proj.weight.grad, shared.up_proj.weight.grad]),
        rtol=1e-5,
        atol=1e-5,
    )
    torch.testing.assert_close(layer.shared_experts.down_proj.weight.grad, shared.down_proj.weight.grad)


def test_deepseek_v3_moe_block_bf16() -> None:
    """Ours under bf16 autocast vs theirs in fp32 (their router would run in bf16 under autocast)."""
    block = deepseek_moe()
    layer = _our_layer_from_deepseek(block, "auto").eval()
    x = torch.randn(BATCH, LENGTH, HIDDEN)
    theirs32 = block(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _ = layer(x)  # routing stays fp32, experts and the shared expert run in bf16
    assert ours.dtype == torch.bfloat16
    assert_rel_close(ours.float(), theirs32, 3e-2, "bf16 ours vs fp32 theirs")
    assert not torch.equal(ours.float(), theirs32)
