"""Reference forwards of LLaDA-MoE and LLaDA2.0-mini, step by step from the spec, on raw tensors.

Written from /work/shared/reference/formats-and-samplers.md §1.4 and §2.4 only; nothing here
uses dlmoe. Every function works on the checkpoint's tensor dict (original names) and its
config.json dict, in the tensors' dtype (the tests use fp32).

Letters: B batch, L length, T = B·L tokens, H hidden size, N heads, K kv heads, d head size,
r rotary dims, E experts, k experts per token, G groups, V vocab.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

Routing = tuple[Tensor, Tensor]  # (experts [T, k] int64, weights [T, k] fp32)


def load_checkpoint(folder: str | Path) -> tuple[dict, dict[str, Tensor]]:
    """(config.json, every tensor of every shard) of a checkpoint folder."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    tensors: dict[str, Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return config, tensors


# --------------------------------------------------------------------------- shared pieces


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """w ⊙ cast(x · rsqrt(mean(x²) + eps)): normalise in fp32, cast back, then scale."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rope(x_BNLd: Tensor, rotary_dim: int, theta: float) -> Tensor:
    """Rotate-half RoPE on the first `rotary_dim` dims of each head, positions arange(L).

    HF "default" init: inv_freq_j = θ^(-2j/r); cos/sin in fp32 over [freqs, freqs], then cast.
    """
    length = x_BNLd.shape[-2]
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    freqs = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)  # [L, r/2]
    angles = torch.cat([freqs, freqs], dim=-1)  # [L, r]
    cos, sin = angles.cos().to(x_BNLd.dtype), angles.sin().to(x_BNLd.dtype)
    rot, rest = x_BNLd[..., :rotary_dim], x_BNLd[..., rotary_dim:]
    half = rotary_dim // 2
    rotate_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    return torch.cat([rot * cos + rotate_half * sin, rest], dim=-1)


def attention(q_BNLd: Tensor, k_BKLd: Tensor, v_BKLd: Tensor, allowed_LL: Tensor | None) -> Tensor:
    """softmax(q·kᵀ/√d) v in fp32 with GQA (query head n reads kv head n // (N/K)); → [B, L, N·d]."""
    batch, heads, length, head_dim = q_BNLd.shape
    group = heads // k_BKLd.shape[1]
    k_BNLd = k_BKLd.repeat_interleave(group, dim=1)
    v_BNLd = v_BKLd.repeat_interleave(group, dim=1)
    scores_BNLL = (q_BNLd.float() @ k_BNLd.float().transpose(-1, -2)) / head_dim**0.5
    if allowed_LL is not None:
        scores_BNLL = scores_BNLL.masked_fill(~allowed_LL, float("-inf"))
    probs_BNLL = scores_BNLL.softmax(-1).to(q_BNLd.dtype)
    out_BNLd = probs_BNLL @ v_BNLd
    return out_BNLd.transpose(1, 2).reshape(batch, length, heads * head_dim)


def block_causal_allowed(length: int, block_size: int) -> Tensor:
    """[L, L] bool: query i sees key j iff block(j) ≤ block(i), block = position // block_size (LLaDA2)."""
    blocks = torch.arange(length) // block_size
    return blocks[None, :] <= blocks[:, None]


def swiglu(x: Tensor, t: dict[str, Tensor], prefix: str) -> Tensor:
    """down(silu(gate(x)) ⊙ up(x)) with `prefix{gate,up,down}_proj.weight`."""
    gate = F.linear(x, t[prefix + "gate_proj.weight"])
    up = F.linear(x, t[prefix + "up_proj.weight"])
    return F.linear(F.silu(gate) * up, t[prefix + "down_proj.weight"])


def combine(x_TH: Tensor, routing: Routing, t: dict[str, Tensor], experts_prefix: str, accumulate=None) -> Tensor:
    """Σ_j w_j · expert_{idx_j}(x), one token at a time (no batching tricks)."""
    experts_TK, weights_TK = routing
    dtype = accumulate or x_TH.dtype
    out_TH = torch.zeros(x_TH.shape, dtype=dtype)
    for token in range(x_TH.shape[0]):
        for e, w in zip(experts_TK[token].tolist(), weights_TK[token], strict=True):
            y = swiglu(x_TH[token : token + 1], t, f"{experts_prefix}{e}.")[0]
            out_TH[token] += w.to(dtype) * y.to(dtype)
    return out_TH.to(x_TH.dtype)


# --------------------------------------------------------------------------- LLaDA-MoE (§1.4)


def lladamoe_route(x_TH: Tensor, gate_EH: Tensor, k: int, expert_bias_E: Tensor | None = None) -> Routing:
    """softmax top-k, no renormalisation. With the bias, p += b first, and the biased values are
    the weights (the in-place add leaks the bias into the gates)."""
    probs_TE = torch.softmax(F.linear(x_TH, gate_EH).float(), dim=-1)
    if expert_bias_E is not None:
        probs_TE = probs_TE + expert_bias_E.float()
    weights_TK, experts_TK = probs_TE.topk(k, dim=-1)
    return experts_TK, weights_TK.to(x_TH.dtype).float()


def lladamoe_moe(x_TH: Tensor, config: dict, t: dict[str, Tensor], layer: int) -> tuple[Tensor, Routing]:
    """The FFN half of MoE layer `layer` on normed inputs: routed experts (+ shared expert)."""
    p = f"model.layers.{layer}."
    routing = lladamoe_route(
        x_TH, t[p + "mlp.gate.weight"], config["num_experts_per_tok"], t.get(p + "mlp.expert_bias")
    )
    out_TH = combine(x_TH, routing, t, p + "mlp.experts.")
    if config.get("shared_expert_intermediate_size"):
        out_TH = out_TH + swiglu(x_TH, t, p + "shared_expert.")
    return out_TH, routing


def lladamoe_forward(config: dict, t: dict[str, Tensor], ids_BL: Tensor) -> tuple[Tensor, list[Routing]]:
    """Logits [B, L, V] and the routing of every MoE layer (bidirectional attention)."""
    batch, length = ids_BL.shape
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = hidden // heads
    rotary_dim = int(head_dim * config["partial_rotary_factor"])
    eps = config["rms_norm_eps"]
    h = F.embedding(ids_BL, t["model.embed_tokens.weight"])
    routings = []
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        # attention half
        x = rms_norm(h, t[p + "input_layernorm.weight"], eps)
        q = F.linear(x, t[p + "self_attn.q_proj.weight"]).view(batch, length, heads, head_dim)
        k = F.linear(x, t[p + "self_attn.k_proj.weight"]).view(batch, length, kv_heads, head_dim)
        v = F.linear(x, t[p + "self_attn.v_proj.weight"]).view(batch, length, kv_heads, head_dim)
        q = rms_norm(q, t[p + "self_attn.q_norm.weight"], eps)  # QK-norm per head, before RoPE
        k = rms_norm(k, t[p + "self_attn.k_norm.weight"], eps)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # [B, N or K, L, d]
        q, k = rope(q, rotary_dim, config["rope_theta"]), rope(k, rotary_dim, config["rope_theta"])
        h = h + F.linear(attention(q, k, v, None), t[p + "self_attn.o_proj.weight"])
        # FFN half
        x_TH = rms_norm(h, t[p + "post_attention_layernorm.weight"], eps).reshape(-1, hidden)
        if config["moe_layer_freq"][i]:
            y_TH, routing = lladamoe_moe(x_TH, config, t, i)
            routings.append(routing)
        else:
            y_TH = swiglu(x_TH, t, p + "mlp.")
        h = h + y_TH.view(batch, length, hidden)
    logits = F.linear(rms_norm(h, t["model.norm.weight"], eps), t["lm_head.weight"])
    return logits, routings


# --------------------------------------------------------------------------- LLaDA2.0-mini (§2.4)


def llada2_route(
    x_TH: Tensor,
    gate_EH: Tensor,
    expert_bias_E: Tensor,
    k: int,
    n_group: int,
    topk_group: int,
    routed_scaling_factor: float,
) -> Routing:
    """Sigmoid scores; pick on s + b inside the `topk_group` best groups (group score = sum of its
    top-2 biased scores); weights from the unbiased s, renormalised (+1e-20) when k > 1, × scale."""
    scores_TE = torch.sigmoid(F.linear(x_TH.float(), gate_EH.float()))
    choice_TE = scores_TE + expert_bias_E.float()
    num_tokens, num_experts = choice_TE.shape
    grouped_TGX = choice_TE.view(num_tokens, n_group, num_experts // n_group)
    group_score_TG = grouped_TGX.topk(2, dim=-1).values.sum(-1)
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
    keep_TG.scatter_(1, group_score_TG.topk(topk_group, dim=-1).indices, True)
    keep_TE = keep_TG.unsqueeze(-1).expand_as(grouped_TGX).reshape(num_tokens, num_experts)
    experts_TK = choice_TE.masked_fill(~keep_TE, float("-inf")).topk(k, dim=-1).indices
    weights_TK = scores_TE.gather(1, experts_TK)
    if k > 1:
        weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
    return experts_TK, weights_TK * routed_scaling_factor


def llada2_moe(x_TH: Tensor, config: dict, t: dict[str, Tensor], layer: int) -> tuple[Tensor, Routing]:
    """The FFN half of MoE layer `layer` on normed inputs: Σ w·expert in fp32, + shared experts."""
    p = f"model.layers.{layer}.mlp."
    routing = llada2_route(
        x_TH,
        t[p + "gate.weight"],
        t[p + "gate.expert_bias"],
        config["num_experts_per_tok"],
        config["n_group"],
        config["topk_group"],
        config["routed_scaling_factor"],
    )
    out_TH = combine(x_TH, routing, t, p + "experts.", accumulate=torch.float32)
    if config.get("num_shared_experts"):
        out_TH = out_TH + swiglu(x_TH, t, p + "shared_experts.")
    return out_TH, routing


def llada2_forward(
    config: dict, t: dict[str, Tensor], ids_BL: Tensor, block_size: int = 32
) -> tuple[Tensor, list[Routing]]:
    """Logits [B, L, V] and per-MoE-layer routing, block-causal attention (LLaDA2's inference mask)."""
    batch, length = ids_BL.shape
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    rotary_dim = int(head_dim * config["partial_rotary_factor"])
    eps = config["rms_norm_eps"]
    allowed_LL = block_causal_allowed(length, block_size)
    h = F.embedding(ids_BL, t["model.word_embeddings.weight"])
    routings = []
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms_norm(h, t[p + "input_layernorm.weight"], eps)
        qkv = F.linear(x, t[p + "attention.query_key_value.weight"]).view(batch, length, heads + 2 * kv_heads, head_dim)
        q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=2)  # rows q | k | v
        if config.get("use_qk_norm", True):
            q = rms_norm(q, t[p + "attention.query_layernorm.weight"], eps)
            k = rms_norm(k, t[p + "attention.key_layernorm.weight"], eps)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        q, k = rope(q, rotary_dim, config["rope_theta"]), rope(k, rotary_dim, config["rope_theta"])
        h = h + F.linear(attention(q, k, v, allowed_LL), t[p + "attention.dense.weight"])
        x_TH = rms_norm(h, t[p + "post_attention_layernorm.weight"], eps).reshape(-1, hidden)
        if i < config["first_k_dense_replace"]:
            y_TH = swiglu(x_TH, t, p + "mlp.")
        else:
            y_TH, routing = llada2_moe(x_TH, config, t, i)
            routings.append(routing)
        h = h + y_TH.view(batch, length, hidden)
    logits = F.linear(rms_norm(h, t["model.norm.weight"], eps), t["lm_head.weight"])
    return logits, routings


def reference_forward(folder: str | Path, ids_BL: Tensor, block_size: int = 32) -> tuple[Tensor, list[Routing]]:
    """Dispatch on config.json's model_type ("lladamoe"/"llada" → LLaDA-MoE, "llada2_moe" → LLaDA2)."""
    config, tensors = load_checkpoint(folder)
    if config["model_type"] == "llada2_moe":
        return llada2_forward(config, tensors, ids_BL, block_size)
    return lladamoe_forward(config, tensors, ids_BL)
