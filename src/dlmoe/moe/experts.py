"""Stacked SwiGLU experts and their compute backends.

Weights are stacked per expert in the nn.Linear (out × in) layout that transformers v5 uses for
fused experts: `gate_up_proj` [E, 2F, D] (gate rows first, then up rows) and `down_proj`
[E, D, F]. The expert input is the dispatched rows [S, D] sorted by expert plus `counts` [E];
nothing here knows about routers, so expert parallelism can exchange rows in between.

Backends (all equal to `loop`, the reference, in forward and backward):
  loop        one matmul pair per expert (Python loop; reads counts back to the host)
  bmm         dense [E, C, D] batched matmul; free when counts are equal (EC), else rows are
              padded to the largest count (capacity-padded TC)
  grouped_mm  torch grouped GEMM over ragged int32 offsets (dropless TC)
  auto        bmm when counts are equal, grouped_mm otherwise

Letters: S slots, D model width, F expert width, H = 2F, E experts, C rows per expert.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dlmoe._checks import check_choice, check_int

BACKENDS = ("auto", "loop", "bmm", "grouped_mm")


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would pick for a matmul on x's device (x.dtype without autocast)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _swiglu(h_SH: Tensor) -> Tensor:
    gate_SF, up_SF = h_SH.chunk(2, dim=-1)
    return F.silu(gate_SF) * up_SF


def swiglu_loop(x_SD: Tensor, counts: Tensor, w_gate_up_EHD: Tensor, w_down_EDF: Tensor) -> Tensor:
    """Reference: one (x @ W_guᵀ → SwiGLU → @ W_dᵀ) per expert on its contiguous rows."""
    outputs = []
    for e, rows_SD in enumerate(x_SD.split(counts.tolist())):
        outputs.append(F.linear(_swiglu(F.linear(rows_SD, w_gate_up_EHD[e])), w_down_EDF[e]))
    return torch.cat(outputs) if outputs else x_SD.new_zeros(0, w_down_EDF.shape[1])


def swiglu_bmm(
    x_SD: Tensor, counts: Tensor, w_gate_up_EHD: Tensor, w_down_EDF: Tensor, *, equal_counts: bool = False
) -> Tensor:
    """Batched matmul over [E, C, D]. With unequal counts, rows are padded to C = max(counts)."""
    num_experts = w_gate_up_EHD.shape[0]
    if equal_counts:
        rows_per_expert = x_SD.shape[0] // num_experts
        x_ECD = x_SD.view(num_experts, rows_per_expert, x_SD.shape[-1])
        return _bmm_swiglu(x_ECD, w_gate_up_EHD, w_down_EDF).reshape(x_SD.shape[0], -1)
    # pad: slot s of expert e goes to row (e, s − offset_e)
    capacity = int(counts.max()) if counts.numel() else 0
    expert_S = torch.repeat_interleave(torch.arange(num_experts, device=x_SD.device), counts)
    starts_E = torch.cumsum(counts, 0) - counts
    row_S = expert_S * capacity + torch.arange(x_SD.shape[0], device=x_SD.device) - starts_E[expert_S]
    x_padded = x_SD.new_zeros(num_experts * capacity, x_SD.shape[-1]).index_copy(0, row_S, x_SD)
    y_ECD = _bmm_swiglu(x_padded.view(num_experts, capacity, -1), w_gate_up_EHD, w_down_EDF)
    return y_ECD.reshape(num_experts * capacity, -1).index_select(0, row_S)


def _bmm_swiglu(x_ECD: Tensor, w_gate_up_EHD: Tensor, w_down_EDF: Tensor) -> Tensor:
    h_ECH = torch.bmm(x_ECD, w_gate_up_EHD.transpose(1, 2))
    return torch.bmm(_swiglu(h_ECH), w_down_EDF.transpose(1, 2))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    grouped_mm's backward rejects expanded (stride-0) gradients, e.g. from `.sum()`.
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def swiglu_grouped_mm(x_SD: Tensor, counts: Tensor, w_gate_up_EHD: Tensor, w_down_EDF: Tensor) -> Tensor:
    """Grouped GEMM over ragged groups delimited by int32 offsets (no padding, no host sync)."""
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    h_SH = _ContiguousGrad.apply(F.grouped_mm(x_SD, w_gate_up_EHD.transpose(1, 2), offs=offsets))
    y_SD = F.grouped_mm(_swiglu(h_SH), w_down_EDF.transpose(1, 2), offs=offsets)
    return _ContiguousGrad.apply(y_SD)


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights; `forward(rows [S, D], counts [E]) -> [S, D]`."""

    def __init__(self, num_experts: int, dim: int, hidden: int, backend: str = "auto") -> None:
        super().__init__()
        check_int("num_experts", num_experts, low=1)
        check_int("dim", dim, low=1)
        check_int("hidden", hidden, low=1)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, dim))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        nn.init.normal_(self.gate_up_proj, std=std)
        # scaled like a residual-branch output projection (GPT-2 / nanoGPT practice)
        nn.init.normal_(self.down_proj, std=std / math.sqrt(2.0))

    def resolve_backend(self, equal_counts: bool) -> str:
        if self.backend != "auto":
            return self.backend
        return "bmm" if equal_counts else "grouped_mm"

    def forward(self, x_SD: Tensor, counts: Tensor, *, equal_counts: bool = False) -> Tensor:
        """Apply expert e to its rows `offsets[e]:offsets[e]+counts[e]` of `x_SD` (sorted by expert).

        Under autocast the matmuls run in the autocast dtype (weights cast once per call).
        """
        dtype = compute_dtype(x_SD)
        x = x_SD.to(dtype)
        w_gu, w_d = self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        backend = self.resolve_backend(equal_counts)
        with torch.autocast(x_SD.device.type, enabled=False):
            if backend == "loop":
                return swiglu_loop(x, counts, w_gu, w_d)
            if backend == "bmm":
                return swiglu_bmm(x, counts, w_gu, w_d, equal_counts=equal_counts)
            return swiglu_grouped_mm(x, counts, w_gu, w_d)

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
