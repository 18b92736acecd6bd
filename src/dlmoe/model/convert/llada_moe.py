"""LLaDA-MoE-7B-A1B (`model_type` "lladamoe"; the Hub's config says "llada"): config and weight layout.

Forward semantics we reproduce (spec: LLaDA-MoE's modeling file as used by dllm):
  bidirectional attention, per-head QK RMSNorm over head_dim before RoPE (rotate-half on the first
  int(head_dim · partial_rotary_factor) dims), MHA/GQA; pre-norm blocks; MoE: softmax over the
  router logits in fp32, top-k without renormalisation or scaling (`norm_topk_prob` and
  `moe_router_score_function` are ignored by the original code, and so here); an optional expert
  bias that the original adds in place to the probabilities (selection *and* weights:
  `bias_in_gate`); an optional shared expert on the layer; dense layers where `moe_layer_freq` is 0.
"""

from __future__ import annotations

from typing import Any

from dlmoe.config import ModelConfig, MoEConfig, RouterConfig
from dlmoe.model.convert.common import CheckpointError, config_int, leading_dense_layers, require, special_ids
from dlmoe.model.convert.layout import DecoderNames, RowGroup, decoder_layout, same

NAME = "lladamoe"
MODEL_TYPES = ("lladamoe", "llada")  # "llada" is what the Hub's LLaDA-MoE config says (clashes with dense LLaDA)


def is_this_format(config: dict[str, Any]) -> bool:
    kind = config.get("model_type")
    return kind == "lladamoe" or (kind == "llada" and "num_experts" in config)


def model_config(config: dict[str, Any], *, block_size: int, mask_id: int | None, folder) -> ModelConfig:
    require(config, ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts"))
    require(config, ("num_experts_per_tok", "expert_intermediate_size", "rope_theta", "partial_rotary_factor"))
    if config.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act={config['hidden_act']!r} is not supported (LLaDA-MoE uses 'silu')")
    if config.get("attention_bias"):
        raise CheckpointError("attention_bias=true is not supported (LLaDA-MoE has no attention biases)")
    if config.get("clip_qkv") is not None:
        raise CheckpointError(f"clip_qkv={config['clip_qkv']!r} is not supported (LLaDA-MoE-7B-A1B sets null)")
    layers = config_int(config, "num_hidden_layers")
    freq = config.get("moe_layer_freq")
    first_dense = leading_dense_layers(freq if freq is not None else [1] * layers, layers, "moe_layer_freq")
    shared = config.get("shared_expert_intermediate_size")
    expert_bias = bool(config.get("moe_router_enable_expert_bias") or False)
    router = RouterConfig(
        kind="token_choice",
        num_experts=config_int(config, "num_experts"),
        num_experts_per_tok=config_int(config, "num_experts_per_tok"),
        score="softmax",
        renormalize=False,  # the original hard-codes it off, whatever norm_topk_prob says
        expert_bias=expert_bias,
        bias_in_gate=expert_bias,
        bias_update_rate=0.0,  # a pretrained bias stays as it is unless a fine-tune sets a rate
    )
    heads = config_int(config, "num_attention_heads")
    head_dim = config.get("head_dim") or config_int(config, "hidden_size") // heads
    mask, eos, pad = special_ids(config, folder, mask_id)
    return ModelConfig(
        vocab_size=config_int(config, "vocab_size"),
        dim=config_int(config, "hidden_size"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        max_seq_len=config_int(config, "max_position_embeddings", default=4096),
        rope_theta=float(config["rope_theta"]),
        partial_rotary_factor=float(config["partial_rotary_factor"]),
        qk_norm=bool(config.get("qk_layernorm") or False),
        norm_eps=float(config.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        dense_hidden=config.get("dense_intermediate_size") or 1,
        first_k_dense=first_dense,
        moe=MoEConfig(
            router=router,
            expert_hidden=config_int(config, "expert_intermediate_size"),
            num_shared_experts=1 if shared else 0,
            shared_hidden=shared or None,
        ),
        attention="bidirectional",
        attention_block_size=block_size,
        mask_id=mask,
        eos_id=eos,
        pad_id=pad,
    )


def _attention(mc: ModelConfig, ours: str, theirs: str) -> list[RowGroup]:
    """Separate q / k / v / o projections under `self_attn`, per-head q_norm / k_norm."""
    dim, head, att = mc.dim, mc.head_size, theirs + "self_attn."
    groups = [
        same(ours + "attn.q_proj.weight", att + "q_proj.weight", (mc.num_heads * head, dim)),
        same(ours + "attn.k_proj.weight", att + "k_proj.weight", (mc.kv_heads * head, dim)),
        same(ours + "attn.v_proj.weight", att + "v_proj.weight", (mc.kv_heads * head, dim)),
        same(ours + "attn.o_proj.weight", att + "o_proj.weight", (dim, mc.num_heads * head)),
    ]
    if mc.qk_norm:
        groups += [
            same(ours + "attn.q_norm.weight", att + "q_norm.weight", (head,)),
            same(ours + "attn.k_norm.weight", att + "k_norm.weight", (head,)),
        ]
    return groups


NAMES = DecoderNames(
    embed="model.embed_tokens.weight",
    attention=_attention,
    expert_bias="mlp.expert_bias",
    shared_experts="shared_expert.",  # on the layer, not under mlp
)


def layout(mc: ModelConfig) -> list[RowGroup]:
    """Row groups of every tensor: ours ↔ the checkpoint's names and shapes."""
    return decoder_layout(mc, NAMES)


def hf_config(mc: ModelConfig) -> dict[str, Any]:
    """A config.json for a model that was not imported (the original keys, our values)."""
    moe = mc.moe
    return {
        "architectures": ["LLaDAMoEModelLM"],
        "model_type": "lladamoe",
        "torch_dtype": "float32",  # set to the weights' dtype on export
        "vocab_size": mc.vocab_size,
        "hidden_size": mc.dim,
        "num_hidden_layers": mc.num_layers,
        "num_attention_heads": mc.num_heads,
        "num_key_value_heads": mc.kv_heads,
        "head_dim": mc.head_size,
        "num_experts": moe.router.num_experts,
        "num_experts_per_tok": moe.router.num_experts_per_tok,
        "expert_intermediate_size": moe.expert_hidden,
        "dense_intermediate_size": mc.dense_hidden,
        "shared_expert_intermediate_size": moe.shared_width or None,
        "moe_layer_freq": [0 if i < mc.first_k_dense else 1 for i in range(mc.num_layers)],
        "rope_theta": mc.rope_theta,
        "partial_rotary_factor": mc.partial_rotary_factor,
        "max_position_embeddings": mc.max_seq_len,
        "rms_norm_eps": mc.norm_eps,
        "qk_layernorm": mc.qk_norm,
        "hidden_act": "silu",
        "attention_bias": False,
        "clip_qkv": None,
        "tie_word_embeddings": mc.tie_embeddings,
        "moe_router_enable_expert_bias": moe.router.expert_bias,
        "norm_topk_prob": False,
        "eos_token_id": mc.eos_id,
        "pad_token_id": mc.pad_id,
        "mask_token_id": mc.mask_id,
    }


def check_exportable(mc: ModelConfig) -> None:
    """What LLaDA-MoE's forward cannot express."""
    problems = []
    if mc.moe is None:
        problems.append("a dense model (LLaDA-MoE is MoE)")
    else:
        r = mc.moe.router
        if r.kind != "token_choice":
            problems.append(f"router.kind={r.kind!r} (LLaDA-MoE routes by token choice)")
        if r.score != "softmax" or r.renormalize or r.routed_scaling_factor != 1.0 or r.n_group:
            problems.append("routing other than softmax top-k without renormalisation, scaling or groups")
        if r.expert_bias and not r.bias_in_gate:
            problems.append("an expert bias used for selection only (LLaDA-MoE also adds it to the weights)")
        if r.scaling_factor:
            problems.append("router.scaling_factor (EC-DLM's norm-matching factor, absent from LLaDA-MoE)")
        if mc.moe.num_shared_experts > 1:
            problems.append("more than one shared expert")
    if mc.attention != "bidirectional":
        problems.append(f"attention={mc.attention!r} (LLaDA-MoE is bidirectional)")
    if problems:
        raise CheckpointError("this model cannot be written as LLaDA-MoE: " + "; ".join(problems))
