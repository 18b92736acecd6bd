"""Shared test inputs for the routing tests."""

import torch


def distinct_logits(batch: int, length: int, num_experts: int, seed: int) -> torch.Tensor:
    """[B, L, E] float32 logits in [-4, 4] with all values distinct (no ties in any ranking)."""
    g = torch.Generator().manual_seed(seed)
    n = batch * length * num_experts
    perm = torch.randperm(n, generator=g).to(torch.float32)
    return (perm / max(n - 1, 1) * 8.0 - 4.0).reshape(batch, length, num_experts)
