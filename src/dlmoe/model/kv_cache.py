"""Key/value cache over the columns of a sampling canvas, for cached diffusion decoding.

A diffusion sampler re-runs the model on the same canvas many times while only a block changes.
The cache holds, per layer, the keys (already rotated with each row's own positions) and values of
canvas columns [0, length); a forward on the columns [start, start + n) computes fresh K/V for
them and attends to the cache with those columns replaced. Which columns the sampler feeds makes
the strategy (DESIGN.md §6, Fast-dLLM):

- prefix: feed [block start, end of canvas) against the cached prefix (approximate: the prefix
  K/V were computed at block start, with the block still masked);
- dual: feed the block only, against cached prefix and suffix (approximate, as prefix);
- exact: with block-causal attention nothing earlier attends to later blocks, so the K/V of
  finished blocks never change: cache them once, feed the block only.

Rows share the column layout (left-padded canvas); `valid` marks padding, which no query attends
to. Letters: B batch, K kv heads, C cached columns, Hd head size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class KVCache:
    """Per-layer keys and values [B, K, C, Hd] of canvas columns [0, C), with their validity and blocks."""

    keys: tuple[Tensor, ...]
    values: tuple[Tensor, ...]
    valid: Tensor  # [B, C] bool: False = padding
    block_ids: Tensor  # [C] int64: attention block of each column (block-causal models)

    @property
    def length(self) -> int:
        return int(self.valid.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.valid.shape[0])

    def write(self, start: int, fresh: KVCache) -> KVCache:
        """A cache whose columns [start, start + fresh.length) hold `fresh` (replacing or appending).

        `start` may not leave a gap: 0 <= start <= self.length."""
        if not 0 <= start <= self.length:
            raise ValueError(f"start must lie in [0, {self.length}] (no gap in the cache), got {start}")
        if fresh.batch_size != self.batch_size or len(fresh.keys) != len(self.keys):
            raise ValueError(
                f"fresh K/V must match the cache: batch {fresh.batch_size} vs {self.batch_size}, "
                f"layers {len(fresh.keys)} vs {len(self.keys)}"
            )
        end = start + fresh.length

        def splice(old: Tensor, new: Tensor, dim: int) -> Tensor:
            head = old.narrow(dim, 0, start)
            tail = old.narrow(dim, min(end, self.length), max(self.length - end, 0))
            return torch.cat([head, new.to(old.dtype), tail], dim=dim)

        return KVCache(
            keys=tuple(splice(o, n, 2) for o, n in zip(self.keys, fresh.keys, strict=True)),
            values=tuple(splice(o, n, 2) for o, n in zip(self.values, fresh.values, strict=True)),
            valid=splice(self.valid, fresh.valid, 1),
            block_ids=splice(self.block_ids, fresh.block_ids, 0),
        )

    def truncate(self, length: int) -> KVCache:
        """The first `length` columns (e.g. a prefix cache cut at the block start)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"length must lie in [0, {self.length}], got {length}")
        return KVCache(
            keys=tuple(k[:, :, :length] for k in self.keys),
            values=tuple(v[:, :, :length] for v in self.values),
            valid=self.valid[:, :length],
            block_ids=self.block_ids[:length],
        )


def spliced(cached: Tensor, fresh: Tensor, start: int) -> Tensor:
    """Attention keys/values: cached columns with [start, start + fresh) replaced by the fresh ones."""
    end = start + fresh.shape[2]
    parts = [cached[:, :, :start].to(fresh.dtype), fresh]
    if end < cached.shape[2]:
        parts.append(cached[:, :, end:].to(fresh.dtype))
    return torch.cat(parts, dim=2) if len(parts) > 1 else fresh
