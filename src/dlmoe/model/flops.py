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
