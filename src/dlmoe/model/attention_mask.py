"""Which query attends to which key: the boolean attention masks of `DiffusionTransformer`.

Single stream: bidirectional (only padding is masked) or block-causal (a token in block b sees
blocks ≤ b), over the fed tokens or a `KVCache` with the fed columns spliced in.

Two streams (block-diffusion training, BD3-LM / LLaDA2): the input is [x_t ; x_0], both halves at
positions 0..L-1. An x_t token of block b sees the x_t tokens of block b and the x_0 tokens of
blocks < b; an x_0 token of block b sees the x_0 tokens of blocks ≤ b. So every x_t block is
denoised given clean earlier blocks — what the sampler with an exact (block-causal) cache feeds
it — and all blocks train in one forward. (Exactly so for per-token or per-block routing; plain
expert choice selects among all 2L routed tokens, unlike a sampler's forward.)

Masks are True = attend. Padding keys are never attended to; padding queries attend to every
key (no empty softmax row; their outputs are unused).

Letters: B batch, L fed length, C key columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dlmoe.model.kv_cache import KVCache


def single_stream_mask(
    block_causal: bool,
    valid_BL: Tensor | None,
    blocks_L: Tensor,
    kv_cache: KVCache | None,
    cache_start: int,
    batch: int,
) -> Tensor | None:
    """[B, L, C] bool, or None when every query may attend to every key."""
    length = int(blocks_L.shape[0])
    if kv_cache is None:
        if valid_BL is None and not block_causal:
            return None
        key_valid = valid_BL if valid_BL is not None else torch.ones_like(blocks_L, dtype=torch.bool).expand(batch, -1)
        key_blocks = blocks_L
    else:
        if kv_cache.batch_size != batch:
            raise ValueError(f"kv_cache holds {kv_cache.batch_size} rows, input has {batch}")
        if not 0 <= cache_start <= kv_cache.length:
            raise ValueError(f"cache_start must lie in [0, {kv_cache.length}] (cached columns), got {cache_start}")
        fed_valid = valid_BL if valid_BL is not None else kv_cache.valid.new_ones(batch, length)
        end = cache_start + length
        key_valid = torch.cat([kv_cache.valid[:, :cache_start], fed_valid, kv_cache.valid[:, end:]], dim=1)
        key_blocks = torch.cat([kv_cache.block_ids[:cache_start], blocks_L, kv_cache.block_ids[end:]])
    if not block_causal and bool(key_valid.all()):
        return None
    mask = key_valid[:, None, :].expand(batch, length, -1)
    if block_causal:
        mask = mask & (key_blocks[None, None, :] <= blocks_L[None, :, None])
    return _padding_queries_see_all(mask, valid_BL)


def two_stream_mask(blocks_L: Tensor, valid_BL: Tensor | None, batch: int) -> Tensor:
    """[B, 2L, 2L] bool over [x_t ; x_0] (blocks_L: the blocks of both halves' columns)."""
    query, key = blocks_L[:, None], blocks_L[None, :]
    noisy_rows = torch.cat([query == key, key < query], dim=1)  # x_t queries: own x_t block, earlier x_0 blocks
    clean_rows = torch.cat([torch.zeros_like(query == key), key <= query], dim=1)  # x_0: block-causal x_0
    mask = torch.cat([noisy_rows, clean_rows], dim=0)[None].expand(batch, -1, -1)
    if valid_BL is None:
        return mask
    valid_B2L = torch.cat([valid_BL, valid_BL], dim=1)
    return _padding_queries_see_all(mask & valid_B2L[:, None, :], valid_B2L)


def _padding_queries_see_all(mask_BLC: Tensor, valid_BL: Tensor | None) -> Tensor:
    return mask_BLC if valid_BL is None else mask_BLC | ~valid_BL[:, :, None]
