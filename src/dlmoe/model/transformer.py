"""Bidirectional transformer for masked diffusion LMs, with MoE feed-forward blocks.

embed → [RMSNorm → attention → RMSNorm → FFN (MoE or dense SwiGLU)] × L → RMSNorm → head.
Attention is bidirectional (no shift between inputs and labels), or block-causal (a block
attends to itself and earlier blocks, which makes a KV cache of finished blocks exact). The
per-sample mask ratio r [B] flows explicitly to every MoE layer: expert-choice capacity schedules
read it. For cached sampling the model runs on a slice of a canvas against a `KVCache` of the
other columns; left padding is carried by `attention_mask` and per-row `position_ids`.
Block-causal models train on two streams [x_t ; x_0] (`clean_input_ids`, see `attention_mask`), so
each noisy block is denoised given clean earlier blocks, as the sampler sees them.

Letters: B batch, L fed length, C key columns, D model width, H heads, K kv heads, Hd head size, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlmoe._checks import check_tensor
from dlmoe.config import BlockRoutingConfig, ModelConfig
from dlmoe.model.attention_mask import single_stream_mask, two_stream_mask
from dlmoe.model.kv_cache import KVCache, spliced
from dlmoe.moe import MoELayer, SwiGLU
from dlmoe.routing.context import RoutingContext, check_block_ids
from dlmoe.routing.dispatch import Dispatch
from dlmoe.routing.plan import plan_forward
from dlmoe.routing.routers import ExpertChoiceRouter


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

    def forward(self, x_BHLd: Tensor, positions_BL: Tensor) -> Tensor:
        cos_table, sin_table = self.tables(x_BHLd.device)
        rot, rest = x_BHLd[..., : self.rotary_dim], x_BHLd[..., self.rotary_dim :]
        cos = cos_table[positions_BL].unsqueeze(1).to(x_BHLd.dtype)  # [B, 1, L, rotary_dim]
        sin = sin_table[positions_BL].unsqueeze(1).to(x_BHLd.dtype)
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

    def forward(
        self,
        x_BLD: Tensor,
        positions_BL: Tensor,
        mask_BLC: Tensor | None,
        cache: tuple[Tensor, Tensor] | None = None,
        cache_start: int = 0,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Attend from the fed tokens to the key columns (the fed ones, spliced into `cache` at
        `cache_start` when given). Returns the output and the fed tokens' fresh (rotated) K/V."""
        batch, length, _ = x_BLD.shape
        q = self.q_proj(x_BLD).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x_BLD).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_BLD).view(batch, length, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H or K, L, Hd]
        q, k = self.rope(q, positions_BL), self.rope(k, positions_BL)
        keys, values = (
            (k, v) if cache is None else (spliced(cache[0], k, cache_start), spliced(cache[1], v, cache_start))
        )
        mask = None if mask_BLC is None else mask_BLC[:, None]  # True = attend
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1)), (k, v)


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
        self,
        x_BLD: Tensor,
        positions_BL: Tensor,
        mask_BLC: Tensor | None,
        mask_ratio_B: Tensor | None,
        routing: RoutingContext | None,
        cache: tuple[Tensor, Tensor] | None,
        cache_start: int,
    ) -> tuple[Tensor, Dispatch | None, Tensor | None, tuple[Tensor, Tensor]]:
        attn_BLD, kv = self.attn(self.attn_norm(x_BLD), positions_BL, mask_BLC, cache, cache_start)
        x_BLD = x_BLD + attn_BLD
        h_BLD = self.ffn_norm(x_BLD)
        if isinstance(self.ffn, MoELayer):
            y_BLD, moe = self.ffn(h_BLD, mask_ratio_B, routing)
            return x_BLD + y_BLD, moe.dispatch, moe.aux_loss, kv
        return x_BLD + self.ffn(h_BLD), None, None, kv


@dataclass
class ModelOutput:
    """Logits plus what the MoE layers report: summed router losses and per-layer dispatches."""

    logits: Tensor
    aux_loss: Tensor
    dispatches: list[Dispatch] = field(default_factory=list)
    kv: KVCache | None = None  # fresh K/V of the fed tokens (with `return_kv=True`)


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
        *,
        clean_input_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        block_ids: Tensor | None = None,
        routing: RoutingContext | None = None,
        kv_cache: KVCache | None = None,
        cache_start: int = 0,
        return_kv: bool = False,
    ) -> ModelOutput:
        """Logits of the fed tokens.

        input_ids: [B, L] int, the fed tokens (a whole sequence, or canvas columns
            [cache_start, cache_start + L) when `kv_cache` is given).
        mask_ratio: [B] routers' timestep (default: fraction of mask tokens among real fed tokens).
        attention_mask: [B, L] (1 = real token, 0 = padding that no query attends to).
        clean_input_ids: [B, L] int, x_0 for two-stream block-diffusion training (block-causal
            models; no cache): the model runs on [input_ids ; clean_input_ids], both at the same
            positions, with `two_stream_mask`, and returns the logits of the input_ids half only.
            Dispatches cover all 2L tokens (x_t, then x_0); mask_ratio defaults to x_t's. The x_t
            logits equal the exact-cache sampler's for per-token (TC) and block routing; plain
            expert choice pools over the 2L routed tokens, so its selection differs slightly.
        position_ids: [B, L] RoPE positions (default: cache_start + arange(L); with padding and no
            cache, the count of real tokens before each one, so left padding shifts nothing).
        block_ids: [L] int64 non-decreasing blocks of the fed columns, shared by all rows: the
            blocks of block-causal attention (default: column // attention_block_size) and, when
            passed, of dMoE block routing (else the router's own block_size).
        routing: per-forward routing options (block routing, EC capacity); padding and block ids
            are filled in from attention_mask and block_ids. Checked once here, for every MoE
            layer, which also share the expert-choice k and capacities computed once (`plan_forward`).
        kv_cache: K/V of the other canvas columns; the fed columns replace theirs.
        return_kv: also return the fed tokens' K/V (`ModelOutput.kv`) to build or extend a cache.
        """
        input_ids = check_tensor("input_ids", input_ids, ndim=2, floating=False)
        batch, length = input_ids.shape
        if routing is not None and not isinstance(routing, RoutingContext):
            raise ValueError(f"routing must be a RoutingContext or None, got {type(routing).__name__}")
        valid_BL = self._valid(attention_mask, batch, length)
        positions_BL = self._positions(position_ids, valid_BL, kv_cache, cache_start, batch, length, input_ids.device)
        blocks_L = self._blocks(block_ids, cache_start, length, input_ids.device)
        if mask_ratio is None:
            is_mask_BL = input_ids == self.config.mask_id
            if valid_BL is None:
                mask_ratio = is_mask_BL.float().mean(1)
            else:
                mask_ratio = (is_mask_BL & valid_BL).sum(1).float() / valid_BL.sum(1).clamp_min(1).float()
        user = routing or RoutingContext()
        routed_valid, routed_blocks = valid_BL, block_ids
        if clean_input_ids is None:
            tokens_BL = input_ids
            block_causal = self.config.block_causal
            mask_BLC = single_stream_mask(block_causal, valid_BL, blocks_L, kv_cache, cache_start, batch)
        else:  # from here on L is 2L: [x_t ; x_0]
            if kv_cache is not None or return_kv:
                raise ValueError("clean_input_ids (two-stream training forward) takes no kv_cache and no return_kv")
            tokens_BL, positions_BL, mask_BLC, routed_valid, routed_blocks = self._two_streams(
                input_ids, clean_input_ids, positions_BL, blocks_L, valid_BL, block_ids, user
            )
        routing = self._routing(user, routed_valid, routed_blocks, mask_ratio, tokens_BL)
        x = self.embed_tokens(tokens_BL)
        aux = x.new_zeros((), dtype=torch.float32)
        dispatches: list[Dispatch] = []
        fresh_keys, fresh_values = [], []
        for index, layer in enumerate(self.layers):
            cache = None if kv_cache is None else (kv_cache.keys[index], kv_cache.values[index])
            x, dispatch, layer_aux, (k, v) = layer(x, positions_BL, mask_BLC, mask_ratio, routing, cache, cache_start)
            if return_kv:
                fresh_keys.append(k)
                fresh_values.append(v)
            if dispatch is not None:
                dispatches.append(dispatch)
                aux = aux + layer_aux
        logits = self.lm_head(self.norm(x[:, :length]))  # two streams: the x_t half only
        kv = None
        if return_kv:
            valid = valid_BL if valid_BL is not None else torch.ones(batch, length, dtype=torch.bool, device=x.device)
            kv = KVCache(tuple(fresh_keys), tuple(fresh_values), valid, blocks_L)
        return ModelOutput(logits=logits, aux_loss=aux, dispatches=dispatches, kv=kv)

    # ------------------------------------------------------------------ input plumbing

    def _valid(self, attention_mask: Tensor | None, batch: int, length: int) -> Tensor | None:
        if attention_mask is None:
            return None
        check_tensor("attention_mask", attention_mask, shape=(batch, length))
        valid = attention_mask.bool()
        return None if bool(valid.all()) else valid

    def _positions(
        self,
        position_ids: Tensor | None,
        valid_BL: Tensor | None,
        kv_cache: KVCache | None,
        cache_start: int,
        batch: int,
        length: int,
        device: torch.device,
    ) -> Tensor:
        if position_ids is not None:
            positions = check_tensor("position_ids", position_ids, shape=(batch, length), floating=False).long()
            low, high = positions.aminmax() if positions.numel() else (0, -1)  # a host read: given positions only
        elif valid_BL is not None and kv_cache is None:
            positions = (valid_BL.long().cumsum(1) - 1).clamp_min(0)
            fits = length <= self.config.max_seq_len  # then the bound is known without reading the tensor
            low, high = 0, length - 1 if fits else int(positions.max())
        else:
            positions = torch.arange(cache_start, cache_start + length, device=device).expand(batch, length)
            low, high = cache_start, cache_start + length - 1
        if length and (int(low) < 0 or int(high) >= self.config.max_seq_len):
            raise ValueError(
                f"positions must lie in [0, model.max_seq_len={self.config.max_seq_len}), got "
                f"[{int(low)}, {int(high)}] (input length {length}, cache_start {cache_start})"
            )
        return positions

    def _blocks(self, block_ids: Tensor | None, cache_start: int, length: int, device: torch.device) -> Tensor:
        if block_ids is None:
            return torch.arange(cache_start, cache_start + length, device=device) // self.config.attention_block_size
        return check_block_ids(block_ids, length, device=device).long()

    def _two_streams(
        self,
        noisy_BL: Tensor,
        clean_input_ids: Tensor,
        positions_BL: Tensor,
        blocks_L: Tensor,
        valid_BL: Tensor | None,
        block_ids: Tensor | None,
        routing: RoutingContext,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
        """Tokens, positions, mask [B, 2L, 2L], and the routed padding [B, 2L] and blocks [2L] of the
        input [x_t ; x_0].

        Routing blocks stay inside one stream (x_0 ids shifted past x_t's), so with block routing
        a clean block is routed on its own, as when the sampler fed it finished."""
        if not self.config.block_causal:
            raise ValueError(
                f"clean_input_ids (two-stream block-diffusion training) needs model.attention='block_causal', "
                f"this model is {self.config.attention!r}"
            )
        clean_BL = check_tensor("clean_input_ids", clean_input_ids, shape=tuple(noisy_BL.shape), floating=False)
        batch, length = noisy_BL.shape
        routed_blocks = block_ids
        block_config = self._block_routing(routing)
        if routed_blocks is None and block_config is not None:  # the router's default blocks, per stream
            routed_blocks = torch.arange(length, device=noisy_BL.device) // block_config.block_size
            span = (length - 1) // block_config.block_size + 1 if length else 0
        elif routed_blocks is not None:
            span = int(routed_blocks[-1] - routed_blocks[0]) + 1 if length else 0
        if routed_blocks is not None:
            routed_blocks = torch.cat([routed_blocks, routed_blocks + span])
        routed_valid = None if valid_BL is None else torch.cat([valid_BL, valid_BL], dim=1)
        tokens = torch.cat([noisy_BL, clean_BL.to(noisy_BL.dtype)], dim=1)
        positions = torch.cat([positions_BL, positions_BL], dim=1)
        return tokens, positions, two_stream_mask(blocks_L, valid_BL, batch), routed_valid, routed_blocks

    def _routing(
        self, user: RoutingContext, valid: Tensor | None, block_ids: Tensor | None, mask_ratio: Tensor, tokens: Tensor
    ) -> RoutingContext:
        """The context every MoE layer of this forward reads: checked once, its EC k and capacities
        computed once (`plan_forward`: at most one host read)."""
        routers = [layer.ffn.router for layer in self.layers if isinstance(layer.ffn, MoELayer)]
        ec = [r for r in routers if isinstance(r, ExpertChoiceRouter)]
        batch, length = tokens.shape
        return plan_forward(
            user,
            valid=valid,
            block_ids=block_ids,
            batch=batch,
            length=length,
            device=tokens.device,
            mask_ratio=mask_ratio,
            router=routers[0].config if routers else None,
            need_capacity=any(r.needs_capacity(user) for r in ec),
        )

    def _block_routing(self, routing: RoutingContext) -> BlockRoutingConfig | None:
        if routing.block is not None:
            return routing.block
        return None if self.config.moe is None else self.config.moe.router.block
