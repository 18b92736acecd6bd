"""`OffloadedExperts`: the experts of one MoE layer, served by an `ExpertStore` instead of parameters.

It takes the place of `moe.experts.Experts` between dispatch and combine — same call, same
backends — so routing and the model code do not change. The dispatch's counts say which experts
have rows; only those are fetched (stacked in expert order), and the compute runs on them with the
rows as dispatched: the rows of an expert with no slots are empty, so dropping it changes nothing
the backend computes for the others, and the output is bit-identical to the resident layer's.
Inference only: the fetched weights carry no gradient.

The stacked weights are a copy; a forward that needs many experts (token routing over a whole
canvas) would hold a second copy of them all at once beside the cache. So the active experts are
computed in chunks of at most `CHUNK_BYTES` of weights — each chunk's rows are contiguous, and an
expert's rows give the same result whichever other experts share its call (the same reason dropping
the idle experts changes nothing). Capacity-padded `bmm` pads to the largest count of its call, so
there the experts go in one call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dlmoe.moe.experts import compute_dtype, resolve_backend, swiglu_bmm, swiglu_grouped_mm, swiglu_loop
from dlmoe.offload.store import ExpertStore

CHUNK_BYTES = 64 * 1024 * 1024  # stacked weights per backend call (the transient beside the cache)


class OffloadedExperts(nn.Module):
    """`forward(rows [S, D], counts [E], gate [S]) -> [S, D]` with expert weights from `store`."""

    def __init__(self, store: ExpertStore, layer: int, num_experts: int, dim: int, hidden: int, backend: str) -> None:
        super().__init__()
        self.store, self.layer = store, layer
        self.num_experts, self.dim, self.hidden, self.backend = num_experts, dim, hidden, backend

    @torch.no_grad()
    def forward(
        self, x_SD: Tensor, counts: Tensor, gate_S: Tensor | None = None, *, equal_counts: bool = False
    ) -> Tensor:
        if torch.is_grad_enabled() and x_SD.requires_grad:
            raise RuntimeError("offloaded experts are for inference: their weights are not parameters")
        counts_host = counts.tolist()  # which experts to fetch: one host read per layer, as the loop backend
        active = [e for e, c in enumerate(counts_host) if c > 0]
        backend = resolve_backend(self.backend, equal_counts, self.dim, self.hidden)  # as the resident Experts
        # equal counts with every expert active is EC's path (bmm without padding); keep it exact
        equal = equal_counts and len(active) == self.num_experts
        self.store.begin(self.layer, active)
        x = x_SD.to(compute_dtype(x_SD))
        if x.shape[0] == 0:
            return x.new_zeros(0, self.dim)
        per_call = len(active) if backend == "bmm" and not equal else max(1, CHUNK_BYTES // self.expert_bytes)
        outputs, start = [], 0
        for first in range(0, len(active), per_call):
            chunk = active[first : first + per_call]
            rows = sum(counts_host[e] for e in chunk)
            gate = None if gate_S is None else gate_S[start : start + rows]
            outputs.append(self._compute(x[start : start + rows], counts, chunk, gate, backend, equal))
            start += rows
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    @property
    def expert_bytes(self) -> int:
        return self.store.expert_bytes(self.layer)

    def _compute(
        self, x: Tensor, counts: Tensor, experts: list[int], gate_S: Tensor | None, backend: str, equal: bool
    ) -> Tensor:
        """The backend on `experts`' rows `x` (contiguous, in expert order) with their weights from the store."""
        w_gu, w_d = self.store.weights(self.layer, experts)
        w_gu, w_d = w_gu.to(device=x.device, dtype=x.dtype), w_d.to(device=x.device, dtype=x.dtype)
        chunk_counts = counts[torch.tensor(experts, device=counts.device)]
        with torch.autocast(x.device.type, enabled=False):
            if backend == "loop":
                return swiglu_loop(x, chunk_counts, w_gu, w_d, gate_S)
            if backend == "bmm":
                return swiglu_bmm(x, chunk_counts, w_gu, w_d, gate_S, equal_counts=equal)
            return swiglu_grouped_mm(x, chunk_counts, w_gu, w_d, gate_S)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, dim={self.dim}, hidden={self.hidden}, offloaded"
