"""Stacked SwiGLU experts and their compute backends.

Weights are stacked per expert in the nn.Linear (out × in) layout that transformers v5 uses for
fused experts: `gate_up_proj` [E, 2F, D] (gate rows first, then up rows) and `down_proj`
[E, D, F]. The expert input is the dispatched rows [S, D] sorted by expert plus `counts` [E]
and, optionally, each row's gate [S]; nothing here knows about routers, so expert parallelism
can exchange rows in between.

The gate is applied to the SwiGLU activation [S, F] before the down projection — the same
result as scaling the output [S, D] (the projection is linear), on half the elements when
F = D/2, and one [S, D] temporary fewer in forward and backward.

Backends (all equal to `loop`, the reference, in forward and backward):
  loop        one matmul pair per expert (Python loop; reads counts back to the host)
  bmm         dense [E, C, D] batched matmul; free when counts are equal (EC, no host read), else
              rows are padded to the largest count (capacity-padded TC; reads that count)
  grouped_mm  torch grouped GEMM over ragged int32 offsets (dropless TC; no host read)
bmm on equal counts and grouped_mm run the fused op of `swiglu_op` (hand-written backward).
  auto        bmm when counts are equal, grouped_mm otherwise (bmm when widths are not
              multiples of 8: grouped GEMM needs 16-byte-aligned row strides)

Letters: S slots, D model width, F expert width, H = 2F, E experts, C rows per expert.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlmoe._checks import check_choice, check_int
from dlmoe.moe.swiglu_op import gated_swiglu_experts
from dlmoe.vocab import EXPERT_BACKENDS as BACKENDS


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would pick for a matmul on x's device (x.dtype without autocast)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _swiglu(h_SH: Tensor, gate_S: Tensor | None = None) -> Tensor:
    """silu(h_gate) · h_up, times the per-row gate when given."""
    gate_SF, up_SF = h_SH.chunk(2, dim=-1)
    act_SF = F.silu(gate_SF) * up_SF
    return act_SF if gate_S is None else act_SF * gate_S.to(act_SF.dtype).unsqueeze(-1)


def swiglu_loop(
    x_SD: Tensor, counts: Tensor, w_gate_up_EHD: Tensor, w_down_EDF: Tensor, gate_S: Tensor | None = None
) -> Tensor:
    """Reference: one (x @ W_guᵀ → SwiGLU (· gate) → @ W_dᵀ) per expert on its contiguous rows."""
    sizes = counts.tolist()
    gates = gate_S.split(sizes) if gate_S is not None else [None] * len(sizes)
    outputs = []
    for e, (rows_SD, g_S) in enumerate(zip(x_SD.split(sizes), gates, strict=True)):
        outputs.append(F.linear(_swiglu(F.linear(rows_SD, w_gate_up_EHD[e]), g_S), w_down_EDF[e]))
    return torch.cat(outputs) if outputs else x_SD.new_zeros(0, w_down_EDF.shape[1])


def swiglu_bmm(
    x_SD: Tensor,
    counts: Tensor,
    w_gate_up_EHD: Tensor,
    w_down_EDF: Tensor,
    gate_S: Tensor | None = None,
    *,
    equal_counts: bool = False,
) -> Tensor:
    """Batched matmul over [E, C, D]. With unequal counts, rows are padded to C = max(counts)."""
    num_experts = w_gate_up_EHD.shape[0]
    if equal_counts:
        return gated_swiglu_experts(x_SD, w_gate_up_EHD, w_down_EDF, gate_S, None)
    # pad: slot s of expert e goes to row (e, s − offset_e); padded rows get gate 0 and are dropped.
    # The padded shape needs the largest count on the host: the one read of this backend (EC takes
    # the equal-counts branch above, with none)
    capacity = int(counts.max()) if counts.numel() else 0
    expert_S = torch.repeat_interleave(torch.arange(num_experts, device=x_SD.device), counts, output_size=x_SD.shape[0])
    starts_E = torch.cumsum(counts, 0) - counts
    row_S = expert_S * capacity + torch.arange(x_SD.shape[0], device=x_SD.device) - starts_E[expert_S]
    x_padded = x_SD.new_zeros(num_experts * capacity, x_SD.shape[-1]).index_copy(0, row_S, x_SD)
    gate_padded = None
    if gate_S is not None:
        gate_padded = gate_S.new_zeros(num_experts * capacity).index_copy(0, row_S, gate_S)
    y_padded = gated_swiglu_experts(x_padded, w_gate_up_EHD, w_down_EDF, gate_padded, None)
    return y_padded.index_select(0, row_S)


def swiglu_grouped_mm(
    x_SD: Tensor, counts: Tensor, w_gate_up_EHD: Tensor, w_down_EDF: Tensor, gate_S: Tensor | None = None
) -> Tensor:
    """Grouped GEMM over ragged groups delimited by int32 offsets (no padding, no host sync)."""
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    return gated_swiglu_experts(x_SD, w_gate_up_EHD, w_down_EDF, gate_S, offsets)


def resolve_backend(backend: str, equal_counts: bool, dim: int, hidden: int) -> str:
    """The backend `backend` runs one dispatch with: "auto" → bmm when counts are equal or the widths
    are not multiples of 8 (grouped GEMM needs 16-byte-aligned rows), else grouped_mm."""
    if backend != "auto":
        return backend
    return "bmm" if equal_counts or not (dim % 8 == 0 and hidden % 8 == 0) else "grouped_mm"


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights; `forward(rows [S, D], counts [E], gate [S]) -> [S, D]`."""

    def __init__(self, num_experts: int, dim: int, hidden: int, backend: str = "auto") -> None:
        super().__init__()
        check_int("num_experts", num_experts, low=1)
        check_int("dim", dim, low=1)
        check_int("hidden", hidden, low=1)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        if backend == "grouped_mm" and not self.grouped_mm_aligned:
            raise ValueError(
                f"backend='grouped_mm' needs dim and hidden to be multiples of 8 (16-byte aligned rows), "
                f"got dim={dim}, hidden={hidden}; use backend='bmm' or 'auto'"
            )
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.gate_up_proj, std=std)
        # scaled like a residual-branch output projection (GPT-2 / nanoGPT practice)
        nn.init.normal_(self.down_proj, std=std / math.sqrt(2.0))

    @property
    def grouped_mm_aligned(self) -> bool:
        return self.dim % 8 == 0 and self.hidden % 8 == 0

    def resolve_backend(self, equal_counts: bool) -> str:
        return resolve_backend(self.backend, equal_counts, self.dim, self.hidden)

    def forward(
        self, x_SD: Tensor, counts: Tensor, gate_S: Tensor | None = None, *, equal_counts: bool = False
    ) -> Tensor:
        """Apply expert e to its rows `offsets[e]:offsets[e]+counts[e]` of `x_SD` (sorted by expert).

        With `gate_S`, row s is scaled by its gate (y_s = gate_s · Expert(x_s)). Under autocast the
        matmuls run in the autocast dtype (weights cast once per call).
        """
        dtype = compute_dtype(x_SD)
        x = x_SD.to(dtype)
        w_gu, w_d = self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        backend = self.resolve_backend(equal_counts)
        if x.shape[0] == 0:
            # e.g. an expert-parallel rank that received no rows: zero grads, not None, and the output
            # stays connected to x, so the backward of the exchange that delivered x still runs here
            # (every rank must join each all_to_all of the backward)
            return (x.sum() + 0.0 * (w_gu.sum() + w_d.sum())).expand(0, self.dim)
        with torch.autocast(x_SD.device.type, enabled=False):
            if backend == "loop":
                return swiglu_loop(x, counts, w_gu, w_d, gate_S)
            if backend == "bmm":
                return swiglu_bmm(x, counts, w_gu, w_d, gate_S, equal_counts=equal_counts)
            return swiglu_grouped_mm(x, counts, w_gu, w_d, gate_S)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, backend={self.backend}"


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP (shared experts, dense layers, the dense baseline)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        nn.init.normal_(self.gate_up_proj.weight, std=0.02)
        nn.init.normal_(self.down_proj.weight, std=0.02 / math.sqrt(2.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(_swiglu(self.gate_up_proj(x)))
