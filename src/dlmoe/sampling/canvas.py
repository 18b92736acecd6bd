"""The sampling canvas: left-padded prompts followed by G mask tokens, and its block layout.

Rows share one column layout: prompts are left-padded to the longest one, so the generation
starts at the same column g0 for every row and the decoding blocks are the same columns
[g0 + j·W, g0 + (j+1)·W). Padding is invisible to the model (attention mask, routing `valid`)
and each row keeps its own positions (RoPE position = count of real tokens before it), so a
row's result does not depend on the other rows of the batch.

Block ids are counted from g0: generated block j has id j; prompt columns get negative ids in
chunks of W counted back from g0 (the blocks dMoE routing and block-causal attention see).

Letters: B batch, P padded prompt width (= g0), G generated length, L = P + G, W block length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from dlmoe._checks import check_int, check_tensor

Prompts = Tensor | Sequence[Sequence[int]] | Sequence[Tensor]


@dataclass(frozen=True)
class Canvas:
    """A batch of left-padded rows [prompt | mask × G] and their layout (tokens are updated in place)."""

    tokens: Tensor  # [B, L] int64
    valid: Tensor  # [B, L] bool: False = left padding
    positions: Tensor  # [B, L] int64 RoPE positions (padding: 0)
    block_ids: Tensor  # [L] int64: floor((column − g0) / W)
    gen_start: int  # g0 = padded prompt width
    block_length: int
    num_blocks: int

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def length(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def padded(self) -> bool:
        return not bool(self.valid.all())

    def block_span(self, block: int) -> tuple[int, int]:
        start = self.gen_start + block * self.block_length
        return start, start + self.block_length

    @property
    def generated(self) -> Tensor:
        return self.tokens[:, self.gen_start :]


def build_canvas(
    prompts: Prompts,
    attention_mask: Tensor | None,
    *,
    gen_length: int,
    block_length: int,
    mask_id: int,
    pad_id: int,
    device: torch.device | str | None = None,
) -> Canvas:
    """Left-pad `prompts` (a [B, P] tensor with an optional left-padding `attention_mask`, or a
    list of token sequences of any lengths) and append `gen_length` masks per row."""
    check_int("gen_length", gen_length, low=1)
    check_int("block_length", block_length, low=1)
    if gen_length % block_length:
        raise ValueError(
            f"gen_length={gen_length} must be a multiple of block_length={block_length} "
            f"(e.g. gen_length={-(-gen_length // block_length) * block_length})"
        )
    rows = _prompt_rows(prompts, attention_mask)
    for b, row in enumerate(rows):
        if row.numel() == 0:
            raise ValueError(
                f"prompt row {b} is empty; give at least one token (e.g. the EOS id for unconditional generation)"
            )
        masked = (row == mask_id).nonzero()
        if len(masked):
            raise ValueError(
                f"prompt_ids must not contain mask_id={mask_id}, found at row {b}, position {int(masked[0])}"
            )
    if pad_id == mask_id:
        raise ValueError(f"pad_id must differ from mask_id={mask_id}")
    width = max(int(r.numel()) for r in rows)
    device = device if device is not None else rows[0].device
    batch, length = len(rows), width + gen_length
    tokens = torch.full((batch, length), mask_id, dtype=torch.long, device=device)
    valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    for b, row in enumerate(rows):
        pad = width - int(row.numel())
        tokens[b, :pad] = pad_id
        tokens[b, pad:width] = row.to(device)
        valid[b, :pad] = False
    positions = (valid.long().cumsum(1) - 1).clamp_min(0)
    block_ids = torch.div(torch.arange(length, device=device) - width, block_length, rounding_mode="floor")
    return Canvas(tokens, valid, positions, block_ids, width, block_length, gen_length // block_length)


def _prompt_rows(prompts: Prompts, attention_mask: Tensor | None) -> list[Tensor]:
    """The real (unpadded) tokens of each prompt row, int64."""
    if isinstance(prompts, Tensor):
        check_tensor("prompt_ids", prompts, ndim=2, floating=False)
        if prompts.dtype == torch.bool:
            raise ValueError("prompt_ids must be an integer tensor of token ids, got dtype torch.bool")
        if prompts.shape[0] < 1:
            raise ValueError(f"prompt_ids must have at least one row, got shape {tuple(prompts.shape)}")
        if attention_mask is None:
            return list(prompts.long())
        check_tensor("attention_mask", attention_mask, shape=tuple(prompts.shape))
        keep = attention_mask.bool()
        # left padding: once a row's real tokens start, they continue to the end
        if bool((keep[:, :-1] & ~keep[:, 1:]).any()):
            raise ValueError("attention_mask must describe left padding (zeros, then ones, per row)")
        return [row[k] for row, k in zip(prompts.long(), keep, strict=True)]
    if attention_mask is not None:
        raise ValueError("attention_mask goes with a [B, P] prompt tensor; a list of prompts needs none")
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ValueError(
            "prompt_ids must be a [B, P] int tensor or a non-empty list of token-id lists, "
            f"got {type(prompts).__name__}"
        )
    rows = []
    for b, row in enumerate(prompts):
        if isinstance(row, Tensor):
            if row.ndim != 1 or row.is_floating_point() or row.dtype == torch.bool:
                raise ValueError(
                    f"prompt row {b} must be a 1-D integer tensor, got {row.dtype} of shape {tuple(row.shape)}"
                )
            rows.append(row.long())
        elif isinstance(row, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in row):
            rows.append(torch.tensor(list(row), dtype=torch.long))
        else:
            raise ValueError(f"prompt row {b} must be a list of int token ids, got {row!r:.80}")
    return rows
