"""The imported models against transformers' own code: OLMoE's MoE block (LLaDA-MoE routing),
DeepSeek-V3's router and MoE (the LLaDA2 gate), and whole Qwen3-MoE / GLM-4-MoE models.

Checkpoints are tiny random ones in the exact layouts (tiny_checkpoints.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dlmoe.model.convert import import_checkpoint
from tests.model.convert import reference as ref
from tests.model.convert import tiny_checkpoints as tiny
from tests.model.convert.helpers import H, assert_same_routing, dense_from_dispatch, dense_from_topk, token_ids, write

# --------------------------------------------------------------------------- routing oracles (transformers)


def olmoe_block(tensors: dict, layer: int, num_experts: int, k: int, width: int):
    """transformers v5 OlmoeSparseMoeBlock with the layer's router and experts (fused gate|up, gate first)."""
    from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    config = OlmoeConfig(
        hidden_size=H, intermediate_size=width, num_experts=num_experts, num_experts_per_tok=k, norm_topk_prob=False
    )
    block = OlmoeSparseMoeBlock(config).eval()
    p = f"model.layers.{layer}.mlp."
    with torch.no_grad():
        block.gate.weight.copy_(tensors[p + "gate.weight"])
        block.experts.gate_up_proj.copy_(torch.stack([
            torch.cat([tensors[p + f"experts.{e}.gate_proj.weight"], tensors[p + f"experts.{e}.up_proj.weight"]])
            for e in range(num_experts)
        ]))  # fmt: skip
        block.experts.down_proj.copy_(
            torch.stack([tensors[p + f"experts.{e}.down_proj.weight"] for e in range(num_experts)])
        )
    return block


def test_lladamoe_moe_block_equals_transformers_olmoe(tmp_path: Path) -> None:
    """No expert bias: LLaDA-MoE's MoE is OLMoE's (softmax top-k, no renormalisation)."""
    folder = write("lladamoe", tmp_path, num_experts=8, top_k=3)
    config, tensors = ref.load_checkpoint(folder)
    model = import_checkpoint(folder).model
    x = torch.randn(2, 6, H, generator=torch.Generator().manual_seed(3))
    for layer in (0, 1):
        block = olmoe_block(tensors, layer, 8, 3, 16)
        ffn = model.model.layers[layer].ffn
        with torch.no_grad():
            want = block(x)
            _, want_weights, want_experts = block.gate(x)
            got = ffn(x)[0]
            got_routing = dense_from_dispatch(ffn.router(x), 8)
        want_routing = dense_from_topk(want_experts, want_weights, 8)
        assert_same_routing(got_routing, want_routing, f"layer {layer}, dlmoe vs OLMoE")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        ref_out, ref_routing = ref.lladamoe_moe(x.reshape(-1, H), config, tensors, layer)  # the reference too
        assert_same_routing(dense_from_topk(*ref_routing, 8), want_routing, f"layer {layer}, reference vs OLMoE")
        torch.testing.assert_close(ref_out.view_as(want), want, rtol=1e-5, atol=1e-5)


def test_lladamoe_expert_bias_moves_selection_and_weights(tmp_path: Path) -> None:
    """With the bias, p += b before top-k and the biased values are the gates (OLMoE has no such bias)."""
    folder = write("lladamoe", tmp_path, expert_bias=True, num_experts=8, top_k=3, shared_width=12)
    config, tensors = ref.load_checkpoint(folder)
    model = import_checkpoint(folder).model
    x_TH = torch.randn(40, H, generator=torch.Generator().manual_seed(4))
    for layer in (0, 1):
        p = f"model.layers.{layer}.mlp."
        ffn = model.model.layers[layer].ffn
        with torch.no_grad():
            got_routing = dense_from_dispatch(ffn.router(x_TH[None]), 8)
            got = ffn(x_TH[None])[0][0]
        want, routing = ref.lladamoe_moe(x_TH, config, tensors, layer)
        assert_same_routing(got_routing, dense_from_topk(*routing, 8), f"layer {layer}")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # the case is not vacuous: the bias changes some picks, and every gate
        unbiased = ref.lladamoe_route(x_TH, tensors[p + "gate.weight"], 3)
        assert not torch.equal(dense_from_topk(*unbiased, 8)[0], got_routing[0])
        assert not torch.allclose(dense_from_topk(*unbiased, 8)[1].sum(-1), got_routing[1].sum(-1))


def deepseek_v3(tensors: dict, layer: int, k: int, num_shared: int = 1):
    """transformers v5 DeepseekV3MoE (router: DeepseekV3TopkRouter) with the layer's LLaDA2 weights."""
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(
        hidden_size=H, n_routed_experts=8, num_experts_per_tok=k, n_group=4, topk_group=2, routed_scaling_factor=2.5,
        norm_topk_prob=True, moe_intermediate_size=8, n_shared_experts=num_shared,
    )  # fmt: skip
    moe = DeepseekV3MoE(config).eval()
    p = f"model.layers.{layer}.mlp."
    with torch.no_grad():
        moe.gate.weight.copy_(tensors[p + "gate.weight"])
        moe.gate.e_score_correction_bias.copy_(tensors[p + "gate.expert_bias"])
        moe.experts.gate_up_proj.copy_(torch.stack([
            torch.cat([tensors[p + f"experts.{e}.gate_proj.weight"], tensors[p + f"experts.{e}.up_proj.weight"]])
            for e in range(8)
        ]))  # fmt: skip
        moe.experts.down_proj.copy_(torch.stack([tensors[p + f"experts.{e}.down_proj.weight"] for e in range(8)]))
        for name in ("gate_proj", "up_proj", "down_proj"):
            getattr(moe.shared_experts, name).weight.copy_(tensors[p + f"shared_experts.{name}.weight"])
    return moe


@pytest.mark.parametrize("k", [2, 3])
def test_llada2_gate_equals_transformers_deepseek_v3_router(tmp_path: Path, k: int) -> None:
    """Sigmoid + expert bias (= e_score_correction_bias), group-limited top-k, renormalised × 2.5."""
    folder = write("llada2_moe", tmp_path, top_k=k)
    config, tensors = ref.load_checkpoint(folder)
    model = import_checkpoint(folder).model
    x = torch.randn(2, 20, H, generator=torch.Generator().manual_seed(5))
    for layer in (1, 2):
        moe = deepseek_v3(tensors, layer, k)
        ffn = model.model.layers[layer].ffn
        with torch.no_grad():
            _, want_weights, want_experts = moe.gate(x)
            want = moe(x)
            got_routing = dense_from_dispatch(ffn.router(x), 8)
            got = ffn(x)[0]
        want_routing = dense_from_topk(want_experts, want_weights, 8)
        assert_same_routing(got_routing, want_routing, f"layer {layer}, dlmoe vs DeepSeek-V3")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        ref_out, ref_routing = ref.llada2_moe(x.reshape(-1, H), config, tensors, layer)  # the reference too
        assert_same_routing(dense_from_topk(*ref_routing, 8), want_routing, f"layer {layer}, reference vs DeepSeek-V3")
        torch.testing.assert_close(ref_out.view_as(want), want, rtol=1e-5, atol=1e-5)
        # not vacuous: groups and bias change the picks of plain sigmoid top-k for some tokens
        p = f"model.layers.{layer}.mlp."
        plain = torch.sigmoid(x.reshape(-1, H) @ tensors[p + "gate.weight"].T).topk(k).indices
        assert not torch.equal(dense_from_topk(plain, torch.ones_like(plain, dtype=torch.float), 8)[0], got_routing[0])


def test_llada2_top1_gate_is_not_renormalised(tmp_path: Path) -> None:
    """k = 1: the gate is 2.5 · sigmoid(logit) of the picked expert (the original renormalises only when k > 1)."""
    folder = write("llada2_moe", tmp_path, top_k=1)
    _, tensors = ref.load_checkpoint(folder)
    router = import_checkpoint(folder).model.model.layers[1].ffn.router
    x_TH = torch.randn(30, H, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        chosen, gates = dense_from_dispatch(router(x_TH[None]), 8)
    scores = torch.sigmoid(x_TH @ tensors["model.layers.1.mlp.gate.weight"].T)
    assert (chosen.sum(-1) == 1).all()
    torch.testing.assert_close(gates[chosen], 2.5 * scores[chosen], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- whole-model oracles (transformers)


def test_lladamoe_equals_transformers_qwen3_moe_under_a_full_mask(tmp_path: Path) -> None:
    """Without expert bias, shared or dense layers and with full RoPE, LLaDA-MoE is Qwen3-MoE (per-head
    QK-norm before RoPE, softmax top-k without renormalisation) with bidirectional attention."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    folder = write("lladamoe", tmp_path, num_kv_heads=2)
    _, tensors = ref.load_checkpoint(folder)
    config = Qwen3MoeConfig(
        vocab_size=tiny.VOCAB, hidden_size=H, intermediate_size=24, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=False, rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        tie_word_embeddings=False, attn_implementation="eager",
    )  # fmt: skip
    oracle = Qwen3MoeForCausalLM(config).eval()
    state = {name: t for name, t in tensors.items() if ".experts." not in name}
    for layer in (0, 1):
        state |= fused_experts(tensors, f"model.layers.{layer}.mlp.", 4)
    oracle.load_state_dict(state, strict=True)
    ids = token_ids()
    full = torch.zeros(2, 1, 12, 12)  # additive mask: every query sees every key
    with torch.no_grad():
        want = oracle(input_ids=ids, attention_mask=full).logits
        got = import_checkpoint(folder).model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.reference_forward(folder, ids)[0], want, rtol=1e-5, atol=1e-5)


def test_llada2_equals_transformers_glm4_moe_under_a_block_causal_mask(tmp_path: Path) -> None:
    """LLaDA2 is GLM-4-MoE (partial RoPE, per-head QK-norm, DeepSeek-V3 gate, shared expert, first
    dense layer) with the fused qkv split q|k|v and LLaDA2's block-causal inference mask."""
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    folder = write("llada2_moe", tmp_path)
    _, tensors = ref.load_checkpoint(folder)
    config = Glm4MoeConfig(
        vocab_size=tiny.VOCAB, hidden_size=H, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, n_shared_experts=1, first_k_dense_replace=1,
        norm_topk_prob=True, use_qk_norm=True, attention_bias=False, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 600000.0, "partial_rotary_factor": 0.5},
        attn_implementation="eager",
    )  # fmt: skip
    oracle = Glm4MoeForCausalLM(config).eval()
    oracle.load_state_dict(glm4_state(tensors), strict=True)
    ids, block = token_ids(length=20), 4
    additive = torch.zeros(20, 20).masked_fill(~ref.block_causal_allowed(20, block), float("-inf"))
    with torch.no_grad():
        want = oracle(input_ids=ids, attention_mask=additive.expand(2, 1, 20, 20)).logits
        got = import_checkpoint(folder, block_size=block).model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref.reference_forward(folder, ids, block)[0], want, rtol=1e-5, atol=1e-5)


def fused_experts(tensors: dict, prefix: str, num_experts: int) -> dict[str, torch.Tensor]:
    """v5 fused experts: gate_up_proj [E, 2I, H] (gate rows, then up rows), down_proj [E, H, I]."""
    gate_up = [
        torch.cat([tensors[f"{prefix}experts.{e}.gate_proj.weight"], tensors[f"{prefix}experts.{e}.up_proj.weight"]])
        for e in range(num_experts)
    ]
    down = [tensors[f"{prefix}experts.{e}.down_proj.weight"] for e in range(num_experts)]
    return {prefix + "experts.gate_up_proj": torch.stack(gate_up), prefix + "experts.down_proj": torch.stack(down)}


def glm4_state(tensors: dict) -> dict[str, torch.Tensor]:
    """LLaDA2 names → GLM-4-MoE names (qkv split by rows, expert bias → e_score_correction_bias)."""
    state = {
        "model.embed_tokens.weight": tensors["model.word_embeddings.weight"],
        "model.norm.weight": tensors["model.norm.weight"],
        "lm_head.weight": tensors["lm_head.weight"],
    }
    for i in range(3):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.attention."
        q, k, v = tensors[a + "query_key_value.weight"].split([4 * 8, 2 * 8, 2 * 8])
        state |= {
            p + "self_attn.q_proj.weight": q,
            p + "self_attn.k_proj.weight": k,
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": tensors[a + "dense.weight"],
            p + "self_attn.q_norm.weight": tensors[a + "query_layernorm.weight"],
            p + "self_attn.k_norm.weight": tensors[a + "key_layernorm.weight"],
            p + "input_layernorm.weight": tensors[p + "input_layernorm.weight"],
            p + "post_attention_layernorm.weight": tensors[p + "post_attention_layernorm.weight"],
        }
        m = p + "mlp."
        if i == 0:
            state |= {m + f"{n}.weight": tensors[m + f"{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj")}
            continue
        state[m + "gate.weight"] = tensors[m + "gate.weight"]
        state[m + "gate.e_score_correction_bias"] = tensors[m + "gate.expert_bias"]
        state |= fused_experts(tensors, m, 8)
        for n in ("gate_proj", "up_proj", "down_proj"):
            state[m + f"shared_experts.{n}.weight"] = tensors[m + f"shared_experts.{n}.weight"]
    return state
