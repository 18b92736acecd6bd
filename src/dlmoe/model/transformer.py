"""Bidirectional transformer for masked diffusion LMs, with MoE feed-forward blocks.

embed → [RMSNorm → attention → RMSNorm → FFN (MoE or dense SwiGLU)] × L → RMSNorm → head.
Attention is fully bidirectional (no shift between inputs and labels). The per-sample mask
ratio r [B] flows explicitly to every MoE layer: expert-choice capacity schedules read it.

Letters: B batch, L length, D model width, H heads, K kv heads, Hd head size, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlmoe._checks import check_tensor
from dlmoe.config import ModelConfig
from dlmoe.moe import MoELayer, SwiGLU
from dlmoe.routing.dispatch import Dispatch


class RMSNorm(nn.Module):
    """x / rms(x) · w, computed in fp32 (bf16 squares lose too much precision)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE on the first `rotary_dim` dims of each head, rotate-half convention (as HF Llama).

    cos/sin tables are computed on first use per device, not stored as buffers: they are not
    weights, and transformers' meta-device loading leaves non-persistent buffers uninitialised.
    """

    def __init__(self, rotary_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.rotary_dim, self.max_seq_len, self.theta = rotary_dim, max_seq_len, theta
        self._tables: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        if device not in self._tables:
            exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float64) / self.rotary_dim
            inv_freq = 1.0 / (self.theta**exponents)
            angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float64), inv_freq)
            angles = torch.cat([angles, angles], dim=-1)  # [L, rotary_dim]
            self._tables[device] = (angles.cos().float().to(device), angles.sin().float().to(device))
        return self._tables[device]

    def forward(self, x_BHLd: Tensor, positions_L: Tensor) -> Tensor:
        cos_table, sin_table = self.tables(x_BHLd.device)
        rot, rest = x_BHLd[..., : self.rotary_dim], x_BHLd[..., self.rotary_dim :]
        cos = cos_table[positions_L].to(x_BHLd.dtype)
        sin = sin_table[positions_L].to(x_BHLd.dtype)
        half = self.rotary_dim // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


class Attention(nn.Module):
    """Multi-head (or grouped-query) bidirectional attention with optional per-head QK RMSNorm."""

    def __init__(self, config: ModelConfig, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.kv_heads, config.head_size
        self.q_proj = nn.Linear(config.dim, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.norm_eps) if config.qk_norm else None
        self.rope = rope

    def forward(self, x_BLD: Tensor, positions_L: Tensor, key_padding_BL: Tensor | None) -> Tensor:
        batch, length, _ = x_BLD.shape
        q = self.q_proj(x_BLD).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x_BLD).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_BLD).view(batch, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H or K, L, Hd]
        q, k = self.rope(q, positions_L), self.rope(k, positions_L)
        mask = None if key_padding_BL is None else key_padding_BL[:, None, None, :]  # True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class Block(nn.Module):
    """Pre-norm transformer block; the FFN is an MoE layer or a dense SwiGLU."""

    def __init__(self, config: ModelConfig, index: int, rope: RotaryEmbedding) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attn = Attention(config, rope)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.ffn: nn.Module = (
            MoELayer(config.moe, config.dim) if config.is_moe_layer(index) else SwiGLU(config.dim, config.dense_hidden)
        )

    def forward(
        self, x_BLD: Tensor, positions_L: Tensor, key_padding_BL: Tensor | None, mask_ratio_B: Tensor | None
    ) -> tuple[Tensor, Dispatch | None, Tensor | None]:
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), positions_L, key_padding_BL)
        h_BLD = self.ffn_norm(x_BLD)
        if isinstance(self.ffn, MoELayer):
            y_BLD, moe = self.ffn(h_BLD, mask_ratio_B)
            return x_BLD + y_BLD, moe.dispatch, moe.aux_loss
        return x_BLD + self.ffn(h_BLD), None, None


@dataclass
class ModelOutput:
    """Logits plus what the MoE layers report: summed router losses and per-layer dispatches."""

    logits: Tensor
    aux_loss: Tensor
    dispatches: list[Dispatch] = field(default_factory=list)


class DiffusionTransformer(nn.Module):
    """The denoiser p_θ(x_0 | x_t): token ids with mask tokens in, logits for every position out."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        rope = RotaryEmbedding(config.rotary_dim, config.max_seq_len, config.rope_theta)
        self.layers = nn.ModuleList(Block(config, i, rope) for i in range(config.num_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, std=std)
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                nn.init.normal_(param, std=std / (2 * self.config.num_layers) ** 0.5)  # residual outputs
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(
        self,
        input_ids: Tensor,
        mask_ratio: Tensor | None = None,
        attention_mask: Tensor | None = None,
    ) -> ModelOutput:
        """input_ids [B, L] int; mask_ratio [B] (default: fraction of mask tokens per row);
        attention_mask [B, L] (1 = real token, 0 = padding that no query attends to)."""
        input_ids = check_tensor("input_ids", input_ids, ndim=2, floating=False)
        batch, length = input_ids.shape
        if length > self.config.max_seq_len:
            raise ValueError(f"input length {length} exceeds model.max_seq_len={self.config.max_seq_len}")
        if mask_ratio is None:
            mask_ratio = (input_ids == self.config.mask_id).float().mean(1)
        key_padding = None if attention_mask is None else attention_mask.bool()
        positions = torch.arange(length, device=input_ids.device)
        x = self.embed_tokens(input_ids)
        aux = x.new_zeros((), dtype=torch.float32)
        dispatches: list[Dispatch] = []
        for layer in self.layers:
            x, dispatch, layer_aux = layer(x, positions, key_padding, mask_ratio)
            if dispatch is not None:
                dispatches.append(dispatch)
                aux = aux + layer_aux
        logits = self.lm_head(self.norm(x))
        return ModelOutput(logits=logits, aux_loss=aux, dispatches=dispatches)
