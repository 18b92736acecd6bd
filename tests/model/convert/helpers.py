"""Shared by the import tests: the variants, token ids, routing comparisons, folder snapshots."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from tests.model.convert import tiny_checkpoints as tiny

H = 32

LLADAMOE_VARIANTS = {
    "plain": {},
    "single_file": {"num_shards": 1},  # model.safetensors, no index
    "hub_model_type_llada": {"model_type": "llada"},
    "expert_bias": {"expert_bias": True},
    "shared_expert": {"shared_width": 12},
    "dense_first_layer": {"num_layers": 3, "moe_layer_freq": [0, 1, 1]},
    "gqa_partial_rope": {"num_kv_heads": 2, "partial_rotary_factor": 0.5},
    "all_options": {
        "model_type": "llada",
        "num_layers": 3,
        "moe_layer_freq": [0, 1, 1],
        "expert_bias": True,
        "shared_width": 12,
        "num_kv_heads": 2,
        "partial_rotary_factor": 0.5,
        "num_experts": 8,
        "top_k": 3,
    },
}
LLADA2_VARIANTS = {
    "mini_like": {},  # 1 dense layer, 8 experts in 4 groups (keep 2), k=2, ×2.5, 1 shared expert, GQA, rope on half
    "top3": {"top_k": 3},
    "top1_no_renormalisation": {"top_k": 1},
    "one_group": {"n_group": 1, "topk_group": 1},
    "two_shared_experts": {"num_shared_experts": 2},
    "no_shared_expert_mha_full_rope": {"num_shared_experts": 0, "num_kv_heads": 4, "partial_rotary_factor": 1.0},
}


def write(kind: str, folder: Path, **options) -> Path:
    return (tiny.write_lladamoe if kind == "lladamoe" else tiny.write_llada2)(folder, **options)


def token_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    """Random ordinary tokens with about a third of them masked."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, tiny.EOS_ID, (batch, length), generator=g)
    return x.masked_fill(torch.rand(batch, length, generator=g) < 0.35, tiny.MASK_ID)


def dense_from_dispatch(dispatch, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([T, E] chosen, [T, E] gate) of a dlmoe Dispatch."""
    chosen = torch.zeros(dispatch.num_tokens, num_experts, dtype=torch.bool)
    gates = torch.zeros(dispatch.num_tokens, num_experts)
    chosen[dispatch.token_index, dispatch.expert_index] = True
    gates[dispatch.token_index, dispatch.expert_index] = dispatch.gate.detach().float()
    return chosen, gates


def dense_from_topk(experts_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int):
    """([T, E] chosen, [T, E] gate) of per-token (expert ids, weights)."""
    chosen = torch.zeros(experts_TK.shape[0], num_experts, dtype=torch.bool).scatter_(1, experts_TK, True)
    gates = torch.zeros(experts_TK.shape[0], num_experts).scatter_(1, experts_TK, weights_TK.detach().float())
    return chosen, gates


def assert_same_routing(got, want, label: str = "") -> None:
    (got_chosen, got_gates), (want_chosen, want_gates) = got, want
    assert torch.equal(got_chosen, want_chosen), f"{label}: tokens pick other experts"
    torch.testing.assert_close(got_gates, want_gates, rtol=1e-6, atol=1e-6, msg=lambda m: f"{label}: {m}")


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}
