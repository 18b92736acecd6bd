"""Shared test inputs for the routing tests."""

import torch


def distinct_logits(batch: int, length: int, num_experts: int, seed: int) -> torch.Tensor:
    """[B, L, E] float32 logits in [-4, 4] with all values distinct (no ties in any ranking)."""
    g = torch.Generator().manual_seed(seed)
    n = batch * length * num_experts
    perm = torch.randperm(n, generator=g).to(torch.float32)
    return (perm / max(n - 1, 1) * 8.0 - 4.0).reshape(batch, length, num_experts)


def generic_logits(length: int, num_experts: int, seed: int) -> torch.Tensor:
    """[L, E] float32 logits drawn from a continuous law: unlike a regular grid, no two tokens'
    softmax scores tie either (shifted rows of a grid have equal softmax)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(length, num_experts, generator=g, dtype=torch.float64).mul(2.0).float()


def left_pad(rows: list[torch.Tensor], length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [L_b, E] rows right-aligned into ([B, length, E], valid [B, length]).

    Padding gets large logits, so a router that let it compete would pick it first.
    """
    num_experts = rows[0].shape[-1]
    g = torch.Generator().manual_seed(seed)
    logits = 5.0 + torch.rand(len(rows), length, num_experts, generator=g)
    valid = torch.zeros(len(rows), length, dtype=torch.bool)
    for b, row in enumerate(rows):
        logits[b, length - row.shape[0] :] = row
        valid[b, length - row.shape[0] :] = True
    return logits, valid


def row_slots(d, row: int = 0, shift: int = 0) -> dict[tuple[int, int], float]:
    """{(position − shift, expert): gate} for the slots of sequence `row` of dispatch `d`."""
    length = d.batch_shape[1]
    out = {}
    for t, e, g in zip(d.token_index.tolist(), d.expert_index.tolist(), d.gate.tolist(), strict=True):
        if t // length == row:
            out[(t % length - shift, e)] = g
    return out


def assert_same_slots(got: dict[tuple[int, int], float], want: dict[tuple[int, int], float], what: str = "") -> None:
    """Same (token, expert) slots exactly; gates equal up to float32 rounding.

    Elementwise CPU kernels (sigmoid, exp) may round a value differently in a vectorised body
    than in the scalar tail, so the same logit can give gates an ulp apart in tensors of
    different lengths; the routing decisions themselves must not differ.
    """
    assert set(got) == set(want), what
    for key, g in got.items():
        assert abs(g - want[key]) <= 1e-6 * max(abs(g), 1e-30) + 1e-12, f"{what}: gate of {key}: {g} != {want[key]}"
