"""`OffloadedExperts`: the experts of one MoE layer, served by an `ExpertStore` instead of parameters.

It takes the place of `moe.experts.Experts` between dispatch and combine — same call, same
backends — so routing and the model code do not change. The dispatch's counts say which experts
have rows; only those are fetched (stacked in expert order), and the compute runs on them with the
rows as dispatched: the rows of an expert with no slots are empty, so dropping it changes nothing
the backend computes for the others, and the output is bit-identical to the resident layer's.
Inference only: the fetched weights carry no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dlmoe.moe.experts import compute_dtype, swiglu_bmm, swiglu_grouped_mm, swiglu_loop
from dlmoe.offload.store import ExpertStore


class OffloadedExperts(nn.Module):
    """`forward(rows [S, D], counts [E], gate [S]) -> [S, D]` with expert weights from `store`."""

    def __init__(self, store: ExpertStore, layer: int, num_experts: int, dim: int, hidden: int, backend: str) -> None:
        super().__init__()
        self.store, self.layer = store, layer
        self.num_experts, self.dim, self.hidden, self.backend = num_experts, dim, hidden, backend

    @property
    def grouped_mm_aligned(self) -> bool:
        return self.dim % 8 == 0 and self.hidden % 8 == 0

    def resolve_backend(self, equal_counts: bool) -> str:
        """The backend the resident `Experts` would pick for this dispatch."""
        if self.backend != "auto":
            return self.backend
        return "bmm" if equal_counts or not self.grouped_mm_aligned else "grouped_mm"

    @torch.no_grad()
    def forward(
        self, x_SD: Tensor, counts: Tensor, gate_S: Tensor | None = None, *, equal_counts: bool = False
    ) -> Tensor:
        if torch.is_grad_enabled() and x_SD.requires_grad:
            raise RuntimeError("offloaded experts are for inference: their weights are not parameters")
        counts_host = counts.tolist()  # which experts to fetch: one host read per layer, as the loop backend
        active = [e for e, c in enumerate(counts_host) if c > 0]
        backend = self.resolve_backend(equal_counts)
        # equal counts with every expert active is EC's path (bmm without padding); keep it exact
        equal = equal_counts and len(active) == self.num_experts
        w_gu, w_d = self.store.weights(self.layer, active)
        dtype = compute_dtype(x_SD)
        x = x_SD.to(dtype)
        w_gu, w_d = w_gu.to(device=x.device, dtype=dtype), w_d.to(device=x.device, dtype=dtype)
        if x.shape[0] == 0:
            return x.new_zeros(0, self.dim)
        active_counts = counts[torch.tensor(active, device=counts.device)]
        with torch.autocast(x_SD.device.type, enabled=False):
            if backend == "loop":
                return swiglu_loop(x, active_counts, w_gu, w_d, gate_S)
            if backend == "bmm":
                return swiglu_bmm(x, active_counts, w_gu, w_d, gate_S, equal_counts=equal)
            return swiglu_grouped_mm(x, active_counts, w_gu, w_d, gate_S)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, offloaded"
