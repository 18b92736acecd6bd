"""Parameter and FLOP counts, total and active (what one token actually uses).

Expert-choice models with a capacity schedule use E[k] over r ~ U(0, 1) experts per token.
Forward FLOPs per token = 2 · active matmul parameters (lm head included, embeddings are lookups)
+ attention scores and values, 4 · layers · seq_len · heads · head_dim. Training ≈ 3 × forward.
"""

from __future__ import annotations

from dataclasses import dataclass

from dlmoe.config import ModelConfig


@dataclass(frozen=True)
class ModelSize:
    total_params: int
    active_params: float
    embedding_params: int
    forward_flops_per_token: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def model_size(config: ModelConfig, seq_len: int | None = None) -> ModelSize:
    """Counts from the config alone (matches `sum(p.numel())` of the built model)."""
    d, heads, kv, hd = config.dim, config.num_heads, config.kv_heads, config.head_size
    attention = d * heads * hd * 2 + d * kv * hd * 2 + (2 * hd if config.qk_norm else 0)
    norms = 2 * d
    dense_ffn = 3 * d * config.dense_hidden
    total = active = 0.0
    for layer in range(config.num_layers):
        total += attention + norms
        active += attention + norms
        if config.is_moe_layer(layer):
            moe = config.moe
            expert = 3 * d * moe.expert_hidden
            shared = 3 * d * moe.shared_width
            router = d * moe.router.num_experts
            total += router + moe.router.num_experts * expert + shared
            active += router + moe.router.expected_experts_per_token() * expert + shared
        else:
            total += dense_ffn
            active += dense_ffn
    embedding = config.vocab_size * d
    head = 0 if config.tie_embeddings else config.vocab_size * d
    total += embedding + head + d
    active += head + d + (config.vocab_size * d if config.tie_embeddings else 0)
    length = seq_len if seq_len is not None else config.max_seq_len
    attention_flops = 4 * config.num_layers * length * heads * hd
    return ModelSize(int(total), active, embedding, 2 * active + attention_flops)


def forward_flops(
    config: ModelConfig, *, batch: int, query_length: int, key_length: int, slots_per_moe_layer: list[int]
) -> float:
    """Matmul FLOPs of one forward that actually ran: `batch` rows of `query_length` fed tokens,
    each attending over `key_length` key columns (cached ones included), with the measured number
    of routed slots (token-expert pairs) in each MoE layer. Embedding lookups count zero."""
    d, heads, kv, hd = config.dim, config.num_heads, config.kv_heads, config.head_size
    tokens = batch * query_length
    moe_layers = [i for i in range(config.num_layers) if config.is_moe_layer(i)]
    if len(slots_per_moe_layer) != len(moe_layers):
        raise ValueError(f"expected slot counts for {len(moe_layers)} MoE layers, got {len(slots_per_moe_layer)}")
    projections = 2 * tokens * (2 * d * heads * hd + 2 * d * kv * hd)
    scores = 4 * batch * query_length * key_length * heads * hd
    flops = config.num_layers * (projections + scores) + 2 * tokens * d * config.vocab_size
    flops += (config.num_layers - len(moe_layers)) * 6 * tokens * d * config.dense_hidden
    if moe_layers:
        moe = config.moe
        per_layer = 2 * tokens * d * moe.router.num_experts + 6 * tokens * d * moe.shared_width
        flops += len(moe_layers) * per_layer + 6 * d * moe.expert_hidden * sum(slots_per_moe_layer)
    return float(flops)
