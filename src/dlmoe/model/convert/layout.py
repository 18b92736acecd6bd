"""How a checkpoint's tensors map onto dlmoe's: groups of rows that are the same in both layouts.

Every difference between the layouts of LLaDA-MoE / LLaDA2 and dlmoe is a re-grouping of rows
with a common last dimension:
  per-expert gate/up/down   E × [F, D] gate, E × [F, D] up  ↔  gate_up_proj [E, 2F, D] = rows (e, gate|up)
                            E × [D, F] down                ↔  down_proj [E, D, F]
  LLaDA2 fused attention    query_key_value [(Hq+2Hk)·d, D] ↔  q_proj | k_proj | v_proj
  dense / shared SwiGLU     gate [F, D], up [F, D]          ↔  gate_up_proj [2F, D]
So a `RowGroup` says: the rows of `ours` (each viewed as [-1, last dim], in order) are the rows of
`theirs` (in order). Import copies their rows into freshly allocated tensors of ours (one copy:
the checkpoint stays memory-mapped); export slices our rows into views (no copy at all). Both are
exact, so export → import round-trips bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from dlmoe.config import ModelConfig


@dataclass(frozen=True)
class RowGroup:
    ours: tuple[str, ...]
    theirs: tuple[tuple[str, tuple[int, ...]], ...]  # (name, expected shape) in row order


def same(ours: str, theirs: str, shape: tuple[int, ...]) -> RowGroup:
    """One tensor under another name."""
    return RowGroup((ours,), ((theirs, shape),))


def rows(tensor: Tensor) -> Tensor:
    return tensor.reshape(-1, tensor.shape[-1]) if tensor.ndim > 1 else tensor.reshape(-1, 1)


def fill_ours(
    group: RowGroup, our_shapes: dict[str, torch.Size], read: Callable[[str], Tensor], dtype: torch.dtype
) -> dict[str, Tensor]:
    """Allocate our tensors of `group` and copy the checkpoint's rows into them, one source at a time."""
    ours = {name: torch.empty(our_shapes[name], dtype=dtype) for name in group.ours}
    targets = iter(rows(ours[name]) for name in group.ours)
    target, position = next(targets), 0
    for name, _ in group.theirs:
        source = rows(read(name))
        done = 0
        while done < source.shape[0]:
            if position == target.shape[0]:
                target, position = next(targets), 0
            take = min(source.shape[0] - done, target.shape[0] - position)
            target[position : position + take].copy_(source[done : done + take])
            position, done = position + take, done + take
    assert position == target.shape[0] and next(targets, None) is None, f"row counts differ in {group}"
    return ours


def split_ours(group: RowGroup, state: dict[str, Tensor]) -> Iterator[tuple[str, Tensor]]:
    """The checkpoint's tensors of `group` as views of our rows (contiguous row ranges)."""
    flat = torch.cat([rows(state[name]) for name in group.ours]) if len(group.ours) > 1 else rows(state[group.ours[0]])
    start = 0
    for name, shape in group.theirs:
        count = flat.shape[0] if not shape else int(torch.Size(shape).numel()) // flat.shape[1]
        yield name, flat[start : start + count].reshape(shape)
        start += count
    assert start == flat.shape[0], f"row counts differ in {group}"


def swiglu_group(ours: str, theirs: str, hidden: int, dim: int) -> list[RowGroup]:
    """A SwiGLU MLP: our fused `gate_up_proj` [2F, D] ↔ their gate_proj, up_proj; down ↔ down."""
    return [
        RowGroup(
            (ours + "gate_up_proj.weight",),
            ((theirs + "gate_proj.weight", (hidden, dim)), (theirs + "up_proj.weight", (hidden, dim))),
        ),
        same(ours + "down_proj.weight", theirs + "down_proj.weight", (dim, hidden)),
    ]


def expert_groups(ours: str, theirs: str, experts: int, hidden: int, dim: int) -> list[RowGroup]:
    """Stacked `gate_up_proj` [E, 2F, D] / `down_proj` [E, D, F] ↔ per-expert gate/up/down."""
    gate_up = tuple(
        (f"{theirs}{e}.{part}_proj.weight", (hidden, dim)) for e in range(experts) for part in ("gate", "up")
    )
    down = tuple((f"{theirs}{e}.down_proj.weight", (dim, hidden)) for e in range(experts))
    return [RowGroup((ours + "gate_up_proj",), gate_up), RowGroup((ours + "down_proj",), down)]


@dataclass(frozen=True)
class DecoderNames:
    """Where a format keeps what differs between LLaDA-MoE and LLaDA2 (names relative to a layer)."""

    embed: str  # the token embedding
    attention: Callable[[ModelConfig, str, str], list[RowGroup]]  # (config, our layer, their layer) → groups
    expert_bias: str
    shared_experts: str


def decoder_layout(mc: ModelConfig, names: DecoderNames) -> list[RowGroup]:
    """Row groups of a pre-norm MoE decoder: embedding, per layer (norms, attention, dense SwiGLU or
    router + bias + experts + shared experts), final norm, untied head."""
    dim, vocab = mc.dim, mc.vocab_size
    groups = [same("model.embed_tokens.weight", names.embed, (vocab, dim))]
    for i in range(mc.num_layers):
        ours, theirs = f"model.layers.{i}.", f"model.layers.{i}."
        groups += [
            same(ours + "attn_norm.weight", theirs + "input_layernorm.weight", (dim,)),
            *names.attention(mc, ours, theirs),
            same(ours + "ffn_norm.weight", theirs + "post_attention_layernorm.weight", (dim,)),
        ]
        if not mc.is_moe_layer(i):
            groups += swiglu_group(ours + "ffn.", theirs + "mlp.", mc.dense_hidden, dim)
            continue
        moe = mc.moe
        experts = moe.router.num_experts
        groups.append(same(ours + "ffn.router.weight", theirs + "mlp.gate.weight", (experts, dim)))
        if moe.router.expert_bias:
            groups.append(same(ours + "ffn.router.expert_bias", theirs + names.expert_bias, (experts,)))
        groups += expert_groups(ours + "ffn.experts.", theirs + "mlp.experts.", experts, moe.expert_hidden, dim)
        if moe.shared_width:
            groups += swiglu_group(ours + "ffn.shared_experts.", theirs + names.shared_experts, moe.shared_width, dim)
    groups.append(same("model.norm.weight", "model.norm.weight", (dim,)))
    if not mc.tie_embeddings:
        groups.append(same("model.lm_head.weight", "lm_head.weight", (vocab, dim)))
    return groups
