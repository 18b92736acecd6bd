"""The expert cache: never over budget, never drops what the forward needs, and the cyclic policy
beats LRU on the access pattern a model makes (its layers in a fixed order, forward after forward)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dlmoe.offload.cache import BudgetError, ExpertCache

LAYERS = [0, 1, 2, 3]


def replay(policy: str, budget_experts: int, forwards: int = 6, experts_per_layer: int = 3) -> ExpertCache:
    """Each forward visits every layer in order and needs the same experts of it (a stable coreset)."""
    cache = ExpertCache(budget_experts, policy, LAYERS)
    for _ in range(forwards):
        for layer in LAYERS:
            keys = {(layer, e) for e in range(experts_per_layer)}
            cache.pin(keys, layer)
            for key in sorted(keys):
                if cache.get(key) is None:
                    cache.put(key, key, 1)
    return cache


@pytest.mark.parametrize("budget", [3, 5, 6, 9, 11])
def test_cyclic_never_worse_than_lru_and_better_when_the_cache_is_short(budget):
    cyclic, lru = replay("cyclic", budget), replay("lru", budget)
    assert cyclic.stats.hits >= lru.stats.hits
    if 3 < budget < 12:  # more than one layer fits, not all four: LRU drops what comes next
        assert cyclic.stats.hits > lru.stats.hits
    if budget <= 9:  # three layers or fewer: LRU never hits at all
        assert lru.stats.hits == 0
    assert max(cyclic.stats.peak_bytes, lru.stats.peak_bytes) <= budget


def test_everything_fits_everything_hits_after_the_first_forward():
    cache = replay("cyclic", 12)
    assert cache.stats.evictions == 0 and cache.stats.hits == 12 * 5


operations = st.lists(
    st.tuples(st.sampled_from(["put", "prefetch", "get", "pin"]), st.integers(0, 3), st.integers(0, 5),
              st.integers(1, 4)),
    max_size=80,
)  # fmt: skip


@given(operations, st.sampled_from(["cyclic", "lru"]), st.integers(4, 12))
def test_budget_and_pins_hold_under_any_sequence(ops, policy, budget):
    cache = ExpertCache(budget, policy, LAYERS)
    pinned: set = set()
    for op, layer, expert, size in ops:
        key = (layer, expert)
        if op == "pin":
            pinned = {k for k in cache.keys() if k[0] == layer} | {key}  # noqa: SIM118 - a method, not a dict
            cache.pin(pinned, layer)
        elif op == "get":
            cache.get(key)
        else:
            held = pinned & set(cache.keys())
            try:
                cache.put(key, key, size, prefetched=op == "prefetch")
            except BudgetError:
                assert op == "put"  # only a needed load raises; a speculative one is skipped
            assert held <= set(cache.keys())  # what the forward needs is never evicted
        assert cache.used <= budget and cache.stats.peak_bytes <= budget


def test_pinned_entries_survive_eviction():
    cache = ExpertCache(3, "lru", LAYERS)
    for e in range(3):
        cache.put((0, e), e, 1)
    cache.pin({(0, 0)}, 0)
    cache.put((1, 0), "x", 2)  # evicts two, never the pinned one
    assert (0, 0) in cache and cache.used == 3
    cache.pin({(0, 0), (1, 0)}, 1)  # the budget is all pinned now
    assert cache.put((1, 1), "y", 2, prefetched=True) is False and cache.stats.skipped_prefetches == 1
    with pytest.raises(BudgetError, match="raise --expert-memory"):
        cache.put((2, 0), "z", 1)
    assert set(cache.keys()) == {(0, 0), (1, 0)}


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "1GiB"])
def test_bad_budget(bad):
    with pytest.raises(ValueError, match="budget must be a positive int"):
        ExpertCache(bad)


def test_bad_policy():
    with pytest.raises(ValueError, match="policy must be one of"):
        ExpertCache(10, "fifo")
