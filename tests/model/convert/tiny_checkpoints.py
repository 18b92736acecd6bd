"""Tiny random checkpoints in the exact on-disk layouts of LLaDA-MoE-7B-A1B and LLaDA2.0-mini.

Same tensor names, same shape pattern and the same config.json keys as the real checkpoints
(spec: /work/shared/reference/formats-and-samplers.md §1.2–1.3 and §2.2–2.3), at toy sizes:
vocab 64, hidden 32, head_dim 8, 2–3 layers, 4–8 experts. Values come from a seeded generator;
tensors are split over `num_shards` safetensors files with a `model.safetensors.index.json`,
as `save_pretrained` writes them.

Special ids sit at the top of the vocab as in the real tokenizers (eos 156892, mask 156895 of
157184): eos 60, mask 63. Neither format's config.json has a mask-id key (the mask is the
tokenizer's `<|mask|>` token; LLaDA2's has no eos key either: pad_token_id is the eos id), so a
`tokenizer.json` and a `tokenizer_config.json` holding the special tokens are written too, as
the real checkpoints ship them.

Letters: H hidden size, N heads, K kv heads, d head size, E experts, I expert width, V vocab.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

VOCAB = 64
EOS_ID = 60  # <|endoftext|>
LLADAMOE_PAD_ID = 61  # distinct from eos, so a swapped mapping shows
MASK_ID = 63  # <|mask|>
INDEX_NAME = "model.safetensors.index.json"


class _Init:
    """Seeded random tensors with realistic scales (norm weights near 1, projections ~ 1/√fan_in)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator) * std + mean

    def linear(self, out_features: int, in_features: int, gain: float = 1.0) -> torch.Tensor:
        return self.normal(out_features, in_features, std=gain / in_features**0.5)

    def norm(self, dim: int) -> torch.Tensor:
        return self.normal(dim, std=0.1, mean=1.0)


# --------------------------------------------------------------------------- LLaDA-MoE


def lladamoe_config(
    *,
    model_type: str = "lladamoe",
    num_layers: int = 2,
    moe_layer_freq: list[int] | None = None,
    hidden_size: int = 32,
    num_heads: int = 4,
    num_kv_heads: int = 4,
    num_experts: int = 4,
    top_k: int = 2,
    expert_width: int = 16,
    dense_width: int = 24,
    shared_width: int | None = None,
    expert_bias: bool = False,
    partial_rotary_factor: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """config.json of LLaDA-MoE (§1.2). head_dim is not a key: the class derives it as H / heads.

    `model_type="llada"` writes the Hub's own spelling (which clashes with dense LLaDA), with the
    Hub's `auto_map`; "lladamoe" is what DL rewrites it to.
    """
    config = {
        "architectures": ["LLaDAMoEModelLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "clip_qkv": None,
        "dense_intermediate_size": dense_width,
        "eos_token_id": EOS_ID,
        "expert_intermediate_size": expert_width,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "max_position_embeddings": 128,
        "model_type": model_type,
        "moe_layer_freq": list(moe_layer_freq) if moe_layer_freq is not None else [1] * num_layers,
        "moe_router_enable_expert_bias": expert_bias,
        "moe_router_score_function": "softmax",
        "norm_topk_prob": False,
        "num_attention_heads": num_heads,
        "num_experts": num_experts,
        "num_experts_per_tok": top_k,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "output_router_logits": False,
        "pad_token_id": LLADAMOE_PAD_ID,
        "partial_rotary_factor": partial_rotary_factor,
        "qk_layernorm": True,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 50000.0,
        "routed_scaling_factor": 1,
        "router_aux_loss_coef": 0.01,
        "router_num_group": None,
        "router_topk_group": None,
        "shared_expert_intermediate_size": shared_width,
        "tie_word_embeddings": False,
        "torch_dtype": _dtype_name(dtype),
        "use_cache": False,
        "vocab_size": VOCAB,
    }
    if model_type == "llada":
        config["auto_map"] = {
            "AutoConfig": "configuration_lladamoe.LLaDAConfig",
            "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
        }
    if len(config["moe_layer_freq"]) != num_layers:
        raise ValueError(f"moe_layer_freq needs {num_layers} entries, got {config['moe_layer_freq']}")
    return config


def lladamoe_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a LLaDA-MoE checkpoint (§1.3), fp32, in save order."""
    init = _Init(seed)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads, head_dim = config["num_key_value_heads"], config["hidden_size"] // config["num_attention_heads"]
    width, dense_width = config["expert_intermediate_size"], config["dense_intermediate_size"]
    shared_width = config["shared_expert_intermediate_size"]
    tensors = {"model.embed_tokens.weight": init.normal(VOCAB, hidden)}
    for i, is_moe in enumerate(config["moe_layer_freq"]):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = init.norm(hidden)
        tensors[p + "self_attn.q_proj.weight"] = init.linear(heads * head_dim, hidden)
        tensors[p + "self_attn.k_proj.weight"] = init.linear(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.v_proj.weight"] = init.linear(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.o_proj.weight"] = init.linear(hidden, hidden)
        tensors[p + "self_attn.q_norm.weight"] = init.norm(head_dim)
        tensors[p + "self_attn.k_norm.weight"] = init.norm(head_dim)
        tensors[p + "post_attention_layernorm.weight"] = init.norm(hidden)
        if is_moe:
            tensors[p + "mlp.gate.weight"] = init.linear(config["num_experts"], hidden, gain=2.0)
            if config["moe_router_enable_expert_bias"]:
                tensors[p + "mlp.expert_bias"] = init.normal(config["num_experts"], std=0.1)
            for e in range(config["num_experts"]):
                tensors.update(_swiglu(init, p + f"mlp.experts.{e}.", hidden, width))
            if shared_width:
                tensors.update(_swiglu(init, p + "shared_expert.", hidden, shared_width))
        else:
            tensors.update(_swiglu(init, p + "mlp.", hidden, dense_width))
    tensors["model.norm.weight"] = init.norm(hidden)
    tensors["lm_head.weight"] = init.linear(VOCAB, hidden)
    return tensors


def write_lladamoe(
    folder: str | Path, *, seed: int = 0, num_shards: int = 2, dtype: torch.dtype = torch.float32, **options
) -> Path:
    """Write a tiny LLaDA-MoE checkpoint; `options` go to `lladamoe_config`. Returns the folder."""
    config = lladamoe_config(dtype=dtype, **options)
    return write_checkpoint(folder, config, lladamoe_tensors(config, seed), num_shards=num_shards, dtype=dtype)


# --------------------------------------------------------------------------- LLaDA2.0-mini


def llada2_config(
    *,
    num_layers: int = 3,
    first_k_dense: int = 1,
    hidden_size: int = 32,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 8,
    num_experts: int = 8,
    top_k: int = 2,
    n_group: int = 4,
    topk_group: int = 2,
    routed_scaling_factor: float = 2.5,
    num_shared_experts: int = 1,
    expert_width: int = 8,
    dense_width: int = 24,
    partial_rotary_factor: float = 0.5,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """config.json of LLaDA2.0-mini (§2.2). `use_qk_norm` is absent, as in the real file (default true).

    There is no eos or mask key: pad_token_id is the eos id (156892 in the real file), and the
    mask id (156895) lives in the tokenizer and the generate() defaults.
    """
    return {
        "architectures": ["LLaDA2MoeModelLM"],
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_llada2_moe.LLaDA2MoeConfig",
            "AutoModel": "modeling_llada2_moe.LLaDA2MoeModel",
            "AutoModelForCausalLM": "modeling_llada2_moe.LLaDA2MoeModelLM",
        },
        "embedding_dropout": 0.0,
        "first_k_dense_replace": first_k_dense,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": dense_width,
        "max_position_embeddings": 128,
        "max_window_layers": num_layers,
        "model_type": "llada2_moe",
        "moe_intermediate_size": expert_width,
        "moe_router_enable_expert_bias": True,
        "n_group": n_group,
        "norm_head": False,
        "norm_softmax": False,
        "norm_topk_prob": True,
        "num_attention_heads": num_heads,
        "num_experts": num_experts,
        "num_experts_per_tok": top_k,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_kv_heads,
        "num_shared_experts": num_shared_experts,
        "output_dropout": 0.0,
        "output_router_logits": False,
        "pad_token_id": EOS_ID,
        "partial_rotary_factor": partial_rotary_factor,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 600000,
        "rotary_dim": int(head_dim * partial_rotary_factor),
        "routed_scaling_factor": routed_scaling_factor,
        "router_dtype": "fp32",
        "score_function": "sigmoid",
        "tie_word_embeddings": False,
        "topk_group": topk_group,
        "torch_dtype": _dtype_name(dtype),
        "use_bias": False,
        "use_cache": False,
        "use_qkv_bias": False,
        "use_rmsnorm": True,
        "use_sliding_window": False,
        "sliding_window": 128,
        "vocab_size": VOCAB,
    }


def llada2_tensors(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of a LLaDA2 checkpoint (§2.3), fp32, in save order; the fused qkv rows are q|k|v."""
    init = _Init(seed)
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, num_experts = config["head_dim"], config["num_experts"]
    width = config["moe_intermediate_size"]
    tensors = {"model.word_embeddings.weight": init.normal(VOCAB, hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = init.norm(hidden)
        tensors[p + "attention.query_key_value.weight"] = init.linear((heads + 2 * kv_heads) * head_dim, hidden)
        tensors[p + "attention.query_layernorm.weight"] = init.norm(head_dim)
        tensors[p + "attention.key_layernorm.weight"] = init.norm(head_dim)
        tensors[p + "attention.dense.weight"] = init.linear(hidden, heads * head_dim)
        tensors[p + "post_attention_layernorm.weight"] = init.norm(hidden)
        if i < config["first_k_dense_replace"]:
            tensors.update(_swiglu(init, p + "mlp.", hidden, config["intermediate_size"]))
            continue
        tensors[p + "mlp.gate.weight"] = init.linear(num_experts, hidden, gain=2.0)
        tensors[p + "mlp.gate.expert_bias"] = init.normal(num_experts, std=0.2)
        for e in range(num_experts):
            tensors.update(_swiglu(init, p + f"mlp.experts.{e}.", hidden, width))
        if config["num_shared_experts"]:
            tensors.update(_swiglu(init, p + "mlp.shared_experts.", hidden, width * config["num_shared_experts"]))
    tensors["model.norm.weight"] = init.norm(hidden)
    tensors["lm_head.weight"] = init.linear(VOCAB, hidden)
    return tensors


def write_llada2(
    folder: str | Path, *, seed: int = 0, num_shards: int = 2, dtype: torch.dtype = torch.float32, **options
) -> Path:
    """Write a tiny LLaDA2.0-mini checkpoint; `options` go to `llada2_config`. Returns the folder."""
    config = llada2_config(dtype=dtype, **options)
    return write_checkpoint(folder, config, llada2_tensors(config, seed), num_shards=num_shards, dtype=dtype)


# --------------------------------------------------------------------------- files


def write_checkpoint(
    folder: str | Path,
    config: dict,
    tensors: dict[str, torch.Tensor],
    *,
    num_shards: int = 2,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """config.json + tokenizer files + `num_shards` safetensors shards (+ index when > 1)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(folder, pad_id=config.get("pad_token_id"))
    tensors = {name: t.to(dtype).contiguous() for name, t in tensors.items()}
    names = list(tensors)
    if num_shards == 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    if not 1 <= num_shards <= len(names):
        raise ValueError(f"num_shards must lie in [1, {len(names)}], got {num_shards}")
    weight_map = {}
    bounds = [round(j * len(names) / num_shards) for j in range(num_shards + 1)]
    for j in range(num_shards):
        file = f"model-{j + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {name: tensors[name] for name in names[bounds[j] : bounds[j + 1]]}
        save_file(chunk, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return folder


def write_tokenizer(folder: Path, *, pad_id: int | None) -> None:
    """tokenizer.json (a word-level vocabulary of V tokens, the specials among its added tokens) and
    tokenizer_config.json naming eos / pad / mask, as a real checkpoint ships them."""
    specials = {EOS_ID: "<|endoftext|>", MASK_ID: "<|mask|>"}
    if pad_id is not None and pad_id not in specials:
        specials[pad_id] = "<|pad|>"
    vocab = {specials.get(i, f"<t{i}>"): i for i in range(VOCAB)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<t0>"))
    tokenizer.pre_tokenizer = WhitespaceSplit()
    tokenizer.add_special_tokens([AddedToken(specials[i], special=True, normalized=False) for i in sorted(specials)])
    tokenizer.save(str(folder / "tokenizer.json"))
    added = {
        str(i): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, content in sorted(specials.items())
    }
    tokenizer_config = {
        "added_tokens_decoder": added,
        "eos_token": specials[EOS_ID],
        "mask_token": specials[MASK_ID],
        "pad_token": specials[pad_id] if pad_id is not None else None,
        "model_max_length": 128,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def _swiglu(init: _Init, prefix: str, hidden: int, width: int) -> dict[str, torch.Tensor]:
    return {
        prefix + "gate_proj.weight": init.linear(width, hidden),
        prefix + "up_proj.weight": init.linear(width, hidden),
        prefix + "down_proj.weight": init.linear(hidden, width),
    }


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
