"""LLaDA2.0-mini / 2.1-mini (`model_type` "llada2_moe"): config and weight layout.

Forward semantics we reproduce (spec: `modeling_llada2_moe.py` as used by dMoE):
  fused query_key_value rows q | k | v (split into our q/k/v projections), per-head QK RMSNorm,
  RoPE on the first head_dim · partial_rotary_factor dims, GQA; block-causal attention at
  inference (a block sees itself and earlier blocks; `block_size`, 32 in LLaDA2's sampler);
  first `first_k_dense_replace` layers dense; MoE gate: sigmoid of fp32 logits, expert bias for
  selection only, group-limited top-k (group score = sum of its top-2 biased scores, keep
  `topk_group` groups), weights from the unbiased scores renormalised when k > 1 and times
  `routed_scaling_factor`; shared experts added densely. `score_function`, `norm_topk_prob` and
  `router_dtype` are ignored by the original code, and so here.
"""

from __future__ import annotations

from typing import Any

from dlmoe.config import ModelConfig, MoEConfig, RouterConfig
from dlmoe.model.convert.common import CheckpointError, config_int, require, special_ids
from dlmoe.model.convert.layout import DecoderNames, RowGroup, decoder_layout, same

NAME = "llada2_moe"
MODEL_TYPES = ("llada2_moe",)


def is_this_format(config: dict[str, Any]) -> bool:
    return config.get("model_type") in MODEL_TYPES


def model_config(config: dict[str, Any], *, block_size: int, mask_id: int | None, folder) -> ModelConfig:
    require(config, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts"))
    require(config, ("num_experts_per_tok", "moe_intermediate_size", "rope_theta", "partial_rotary_factor"))
    for key in ("use_bias", "use_qkv_bias"):
        if config.get(key):
            raise CheckpointError(f"{key}=true is not supported (LLaDA2.0-mini has no linear biases)")
    layers = config_int(config, "num_hidden_layers")
    first_dense = config_int(config, "first_k_dense_replace", default=0)
    if first_dense > layers:
        raise CheckpointError(f"config.json: first_k_dense_replace={first_dense} exceeds num_hidden_layers={layers}")
    k = config_int(config, "num_experts_per_tok")
    n_group, topk_group = config.get("n_group"), config.get("topk_group")
    grouped = n_group is not None and n_group > 1
    router = RouterConfig(
        kind="token_choice",
        num_experts=config_int(config, "num_experts"),
        num_experts_per_tok=k,
        score="sigmoid",
        renormalize=k > 1,  # the original renormalises only when k > 1
        expert_bias=bool(config.get("moe_router_enable_expert_bias") or False),
        bias_update_rate=0.0,  # a pretrained bias stays as it is unless a fine-tune sets a rate
        n_group=n_group if grouped else None,
        topk_group=topk_group if grouped else None,
        routed_scaling_factor=float(config.get("routed_scaling_factor") or 1.0),
    )
    shared = config_int(config, "num_shared_experts", default=0)
    expert_hidden = config_int(config, "moe_intermediate_size")
    heads = config_int(config, "num_attention_heads")
    mask, eos, pad = special_ids(config, folder, mask_id, eos_is_pad=True)
    return ModelConfig(
        vocab_size=config_int(config, "vocab_size"),
        dim=config_int(config, "hidden_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or config_int(config, "hidden_size") // heads,
        max_seq_len=config_int(config, "max_position_embeddings", default=4096),
        rope_theta=float(config["rope_theta"]),
        partial_rotary_factor=float(config["partial_rotary_factor"]),
        qk_norm=bool(config.get("use_qk_norm", True)),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        dense_hidden=config.get("intermediate_size") or 1,
        first_k_dense=first_dense,
        moe=MoEConfig(
            router=router,
            expert_hidden=expert_hidden,
            num_shared_experts=shared,
            shared_hidden=shared * expert_hidden or None,
        ),
        attention="block_causal",
        attention_block_size=block_size,
        mask_id=mask,
        eos_id=eos,
        pad_id=pad,
    )


def _attention(mc: ModelConfig, ours: str, theirs: str) -> list[RowGroup]:
    """The fused query_key_value (rows q | k | v) and `dense` output under `attention`, per-head norms."""
    dim, head, att = mc.dim, mc.head_size, theirs + "attention."
    fused = ((att + "query_key_value.weight", ((mc.num_heads + 2 * mc.kv_heads) * head, dim)),)
    groups = [
        RowGroup(tuple(ours + f"attn.{p}_proj.weight" for p in "qkv"), fused),
        same(ours + "attn.o_proj.weight", att + "dense.weight", (dim, mc.num_heads * head)),
    ]
    if mc.qk_norm:
        groups += [
            same(ours + "attn.q_norm.weight", att + "query_layernorm.weight", (head,)),
            same(ours + "attn.k_norm.weight", att + "key_layernorm.weight", (head,)),
        ]
    return groups


NAMES = DecoderNames(
    embed="model.word_embeddings.weight",
    attention=_attention,
    expert_bias="mlp.gate.expert_bias",
    shared_experts="mlp.shared_experts.",
)


def layout(mc: ModelConfig) -> list[RowGroup]:
    """Row groups of every tensor: ours ↔ the checkpoint's names and shapes."""
    return decoder_layout(mc, NAMES)


def hf_config(mc: ModelConfig) -> dict[str, Any]:
    moe, r = mc.moe, mc.moe.router
    return {
        "architectures": ["LLaDA2MoeModelLM"],
        "model_type": "llada2_moe",
        "torch_dtype": "float32",  # set to the weights' dtype on export
        "vocab_size": mc.vocab_size,
        "hidden_size": mc.dim,
        "num_hidden_layers": mc.num_layers,
        "num_attention_heads": mc.num_heads,
        "num_key_value_heads": mc.kv_heads,
        "head_dim": mc.head_size,
        "intermediate_size": mc.dense_hidden,
        "moe_intermediate_size": moe.expert_hidden,
        "num_experts": r.num_experts,
        "num_experts_per_tok": r.num_experts_per_tok,
        "num_shared_experts": moe.num_shared_experts,
        "first_k_dense_replace": mc.first_k_dense,
        "n_group": r.n_group or 1,
        "topk_group": r.topk_group or 1,
        "routed_scaling_factor": r.routed_scaling_factor,
        "score_function": "sigmoid",
        "moe_router_enable_expert_bias": r.expert_bias,
        "norm_topk_prob": True,
        "rope_theta": mc.rope_theta,
        "partial_rotary_factor": mc.partial_rotary_factor,
        "rms_norm_eps": mc.norm_eps,
        "max_position_embeddings": mc.max_seq_len,
        "use_qk_norm": mc.qk_norm,
        "use_bias": False,
        "use_qkv_bias": False,
        "tie_word_embeddings": mc.tie_embeddings,
        "eos_token_id": mc.eos_id,
        "pad_token_id": mc.pad_id,
        "mask_token_id": mc.mask_id,
    }


def check_exportable(mc: ModelConfig) -> None:
    problems = []
    if mc.moe is None:
        problems.append("a dense model (LLaDA2 is MoE)")
    else:
        r = mc.moe.router
        if r.kind != "token_choice":
            problems.append(f"router.kind={r.kind!r} (LLaDA2 routes by token choice)")
        if r.score != "sigmoid" or r.renormalize != (r.num_experts_per_tok > 1) or r.bias_in_gate:
            problems.append("routing other than sigmoid top-k renormalised when k > 1, bias for selection only")
        if r.scaling_factor:
            problems.append("router.scaling_factor (EC-DLM's norm-matching factor, absent from LLaDA2)")
        shared = mc.moe.num_shared_experts
        if shared and mc.moe.shared_width != shared * mc.moe.expert_hidden:
            problems.append("shared experts whose width is not num_shared_experts × expert width")
    if not mc.block_causal:
        problems.append(f"attention={mc.attention!r} (LLaDA2 is block-causal)")
    if problems:
        raise CheckpointError("this model cannot be written as LLaDA2: " + "; ".join(problems))
