"""A byte-bounded cache of expert weights, shared by every layer, safe to fill from two threads.

Keys are (layer, expert); a value is whatever the loader returns (the expert's weight tensors) and
its size in bytes. The cache never holds more than `budget` bytes: an insert first evicts entries
that are not pinned (the experts the forward being computed needs), and an insert that could only
fit by evicting pinned entries is refused — for a speculative load that means it is skipped, for a
needed one it is an error that names the budget to ask for.

Which entries go first is the policy. "lru": least recently used. "cyclic" (the default): a model's
layers run in a fixed order, forward after forward, so the expert whose layer runs again last is
the one to drop (Belady's choice for a cyclic scan, where LRU drops exactly what comes next): the
layers after the current one are kept first, the current layer's unneeded experts go first; LRU
among a layer's own.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

Key = tuple[int, int]  # (layer, expert)


@dataclass
class CacheStats:
    """Counters of one cache (a generation reads their change)."""

    hits: int = 0  # needed experts found in the cache
    loads: int = 0  # needed experts read from disk at the moment they were needed
    prefetched: int = 0  # experts read ahead by the background thread
    prefetch_hits: int = 0  # needed experts that were there because they had been prefetched
    skipped_prefetches: int = 0  # speculative reads dropped for lack of unpinned room
    evictions: int = 0
    bytes_read: int = 0  # by needed loads and prefetches together
    load_seconds: float = 0.0  # wall time spent reading (both threads)
    peak_bytes: int = 0  # the most bytes the cache ever held

    def snapshot(self) -> dict[str, Any]:
        return dict(self.__dict__)


class BudgetError(ValueError):
    """The experts one forward needs do not fit the budget at once."""


POLICIES = ("cyclic", "lru")


class ExpertCache:
    """(layer, expert) → weights within a byte budget; `pinned` keys are never evicted."""

    def __init__(self, budget: int, policy: str = "cyclic", layers: list[int] | None = None) -> None:
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"expert cache budget must be a positive int of bytes, got {budget!r}")
        if policy not in POLICIES:
            raise ValueError(f"expert cache policy must be one of {list(POLICIES)}, got {policy!r}")
        self.budget, self.policy = budget, policy
        self.layers = list(layers or [])  # the order layers run in (the cyclic policy's clock)
        self.current: int | None = None  # the layer being computed
        self.used = 0
        self.stats = CacheStats()
        self.lock = threading.Lock()
        self._entries: OrderedDict[Key, tuple[Any, int, bool]] = OrderedDict()  # value, bytes, prefetched
        self._pinned: set[Key] = set()

    def __contains__(self, key: Key) -> bool:
        with self.lock:
            return key in self._entries

    def keys(self) -> list[Key]:
        with self.lock:
            return list(self._entries)

    def get(self, key: Key) -> Any | None:
        """The value (now most recently used) or None; counts a hit."""
        with self.lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            value, nbytes, prefetched = entry
            self.stats.hits += 1
            if prefetched:
                self.stats.prefetch_hits += 1
                self._entries[key] = (value, nbytes, False)
            return value

    def pin(self, keys: set[Key], layer: int | None = None) -> None:
        """Protect `keys` (the forward being computed, of `layer`) from eviction until the next `pin`."""
        with self.lock:
            self._pinned = set(keys)
            self.current = layer

    def _victims(self) -> list[Key]:
        """Unpinned keys, the first to evict first."""
        lru = [k for k in self._entries if k not in self._pinned]  # least recently used first
        if self.policy == "lru" or self.current not in self.layers:
            return lru
        position = {layer: i for i, layer in enumerate(self.layers)}
        now, count = position[self.current], len(self.layers)
        # runs again after (position − now − 1) mod count other layers: the current layer's last
        return sorted(lru, key=lambda k: -((position.get(k[0], now) - now - 1) % count))

    def put(self, key: Key, value: Any, nbytes: int, *, prefetched: bool = False) -> bool:
        """Insert `key` (evicting unpinned LRU entries to make room). Returns False when it cannot fit
        without evicting pinned entries: raises BudgetError for a needed load, skips a prefetch."""
        with self.lock:
            if key in self._entries:
                return True
            evictable = self._victims()
            room = self.budget - self.used + sum(self._entries[k][1] for k in evictable)
            if nbytes > room:
                if prefetched:
                    self.stats.skipped_prefetches += 1
                    return False
                pinned = sum(self._entries[k][1] for k in self._pinned if k in self._entries)
                raise BudgetError(
                    f"the experts this forward needs ({pinned + nbytes} bytes so far) exceed the expert memory "
                    f"budget of {self.budget} bytes; raise --expert-memory (or narrow block routing's coreset)"
                )
            for victim in evictable:
                if self.used + nbytes <= self.budget:
                    break
                _, freed, _ = self._entries.pop(victim)
                self.used -= freed
                self.stats.evictions += 1
            self._entries[key] = (value, nbytes, prefetched)
            self.used += nbytes
            self.stats.peak_bytes = max(self.stats.peak_bytes, self.used)
            return True

    def count_read(self, nbytes: int, seconds: float, *, prefetched: bool) -> None:
        with self.lock:
            self.stats.bytes_read += nbytes
            self.stats.load_seconds += seconds
            if prefetched:
                self.stats.prefetched += 1
            else:
                self.stats.loads += 1

    def clear(self) -> None:
        with self.lock:
            self._entries.clear()
            self._pinned = set()
            self.used = 0
