"""The expert store: a model folder's routed-expert weights, read on demand into a bounded cache.

Dense weights, attention and shared experts stay resident; the stacked routed experts
(`…ffn.experts.gate_up_proj` [E, 2F, D], `…ffn.experts.down_proj` [E, D, F]) of every MoE layer
stay on disk. A layer's forward asks for exactly the experts its router chose (block routing: the
coreset, shared by every token of the block); the store returns them stacked, loading the missing
ones, and then speculatively reads, on a background thread, the experts the *next* MoE layer used in
its previous forward — a block's coreset rarely changes between its denoising steps (the store
counts how often it does), so by the time that layer runs its experts are usually there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dlmoe.offload.cache import ExpertCache, Key
from dlmoe.offload.files import OffloadError, StoredTensor, read_row, tensor_directory

EXPERT_TENSORS = ("gate_up_proj", "down_proj")


def expert_tensor_name(layer: int, which: str) -> str:
    return f"model.layers.{layer}.ffn.experts.{which}"


class ExpertStore:
    """Routed experts of the MoE layers `layers` of `model_dir`, within `budget` bytes of memory."""

    def __init__(
        self, model_dir: str | Path, budget: int, layers: list[int], *, prefetch: bool = True, policy: str = "cyclic"
    ) -> None:
        self.model_dir = Path(model_dir)
        self.directory = tensor_directory(self.model_dir)
        self.layers = sorted(layers)
        self.cache = ExpertCache(budget, policy, self.layers)
        self._tensors: dict[int, tuple[StoredTensor, StoredTensor]] = {}
        for layer in self.layers:
            names = [expert_tensor_name(layer, which) for which in EXPERT_TENSORS]
            missing = [n for n in names if n not in self.directory]
            if missing:
                raise OffloadError(f"{self.model_dir} has no {missing}: not a dlmoe model with MoE layer {layer}")
            self._tensors[layer] = tuple(self.directory[n] for n in names)  # type: ignore[assignment]
        largest = max((self.expert_bytes(layer) for layer in self.layers), default=0)
        if budget < largest:
            raise ValueError(f"expert memory budget of {budget} bytes is smaller than one expert ({largest} bytes)")
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dlmoe-expert-prefetch") if prefetch else None
        self._inflight: dict[Key, Future] = {}
        self._inflight_lock = threading.Lock()
        self.previous: dict[int, tuple[int, ...]] = {}  # each layer's experts at its last forward
        self.forwards: dict[int, int] = dict.fromkeys(self.layers, 0)
        self.changes: dict[int, int] = dict.fromkeys(self.layers, 0)  # forwards whose set differed from the last

    # ------------------------------------------------------------------ sizes

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one expert of `layer` (its gate/up and down rows)."""
        return sum(t.row_bytes for t in self._tensors[layer])

    def dense_tensors(self) -> dict[str, StoredTensor]:
        """Every tensor that stays resident: all but the routed experts of the offloaded layers."""
        offloaded = {expert_tensor_name(layer, which) for layer in self.layers for which in EXPERT_TENSORS}
        return {name: t for name, t in self.directory.items() if name not in offloaded}

    # ------------------------------------------------------------------ the forward's experts

    def begin(self, layer: int, experts: list[int]) -> None:
        """A forward of `layer` needs `experts`: count whether its set changed, read the next layer ahead."""
        self._record(layer, tuple(experts))
        self._prefetch_next(layer)

    def weights(self, layer: int, experts: list[int]) -> tuple[Tensor, Tensor]:
        """The stacked weights ([n, 2F, D], [n, D, F]) of `experts` (ascending, at least one) of `layer`."""
        keys = [(layer, e) for e in experts]
        self.cache.pin(set(keys), layer)
        pairs = [self._present(key) for key in keys]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def _present(self, key: Key) -> tuple[Tensor, Tensor]:
        with self._inflight_lock:
            pending = self._inflight.get(key)
        if pending is not None:
            pending.result()  # a prefetch of this expert is under way: wait for it rather than read twice
        value = self.cache.get(key)
        if value is None:
            value = self._load(key, prefetched=False)
        return value

    def _load(self, key: Key, *, prefetched: bool) -> Any:
        layer, expert = key
        started = time.perf_counter()
        value = tuple(read_row(t, expert) for t in self._tensors[layer])
        self.cache.count_read(self.expert_bytes(layer), time.perf_counter() - started, prefetched=prefetched)
        self.cache.put(key, value, self.expert_bytes(layer), prefetched=prefetched)
        return value

    def _record(self, layer: int, experts: tuple[int, ...]) -> None:
        self.forwards[layer] += 1
        if layer in self.previous and self.previous[layer] != experts:
            self.changes[layer] += 1
        self.previous[layer] = experts

    # ------------------------------------------------------------------ speculation

    def _prefetch_next(self, layer: int) -> None:
        """Read ahead, in the background, the experts the next MoE layer used at its last forward."""
        if self._executor is None:
            return
        following = self.layers[(self.layers.index(layer) + 1) % len(self.layers)]
        for expert in self.previous.get(following, ()):
            key = (following, expert)
            with self._inflight_lock:
                if key in self._inflight or key in self.cache:
                    continue
                self._inflight[key] = self._executor.submit(self._speculate, key)

    def _speculate(self, key: Key) -> None:
        try:
            if key not in self.cache:
                self._load(key, prefetched=True)
        finally:
            with self._inflight_lock:
                self._inflight.pop(key, None)

    # ------------------------------------------------------------------ lifetime and figures

    def drain(self) -> None:
        """Wait for every read ahead still running (a generation ends with none in flight)."""
        with self._inflight_lock:
            pending = list(self._inflight.values())
        for future in pending:
            future.result()

    def close(self) -> None:
        """Stop the background reader and drop every cached expert."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self.cache.clear()

    def measure(self) -> Callable[[], dict[str, Any]]:
        """Start measuring one generation: returns the function that, at its end, gives the
        `GenerationStats` offload fields over it (read-aheads still in flight are waited for)."""
        with self.cache.lock:
            self.cache.stats.peak_bytes = self.cache.used
        before = self.cache.stats.snapshot()

        def finish() -> dict[str, Any]:
            self.drain()
            now = self.figures()
            return {
                "expert_loads": now["loads"] - before["loads"],
                "expert_hits": now["hits"] - before["hits"],
                "expert_prefetched": now["prefetched"] - before["prefetched"],
                "expert_bytes_read": now["bytes_read"] - before["bytes_read"],
                "expert_load_seconds": now["load_seconds"] - before["load_seconds"],
                "peak_expert_bytes": now["peak_bytes"],
                "expert_set_change_rate": now["set_change_rate"],
            }

        return finish

    def figures(self) -> dict[str, Any]:
        """Cache counters plus how often each layer's expert set changed between its forwards."""
        changed = sum(self.changes.values())
        compared = sum(max(n - 1, 0) for n in self.forwards.values())
        return self.cache.stats.snapshot() | {
            "budget_bytes": self.cache.budget,
            "resident_bytes": self.cache.used,
            "set_change_rate": changed / compared if compared else None,
        }

    def __enter__(self) -> ExpertStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
