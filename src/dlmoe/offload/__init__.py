"""Expert offloading: run an MoE DLM whose routed experts do not fit in memory.

`load_offloaded(model_dir, budget)` builds the model with its routed experts left on disk; an
`ExpertStore` reads the experts each forward's router chose (block routing: the block's coreset)
into a byte-bounded LRU cache and reads ahead what the next layer used last time. Between routing
and expert compute: `OffloadedExperts` takes the place of `moe.experts.Experts`.
"""

from dlmoe.offload.cache import BudgetError, CacheStats, ExpertCache
from dlmoe.offload.experts import OffloadedExperts
from dlmoe.offload.files import OffloadError
from dlmoe.offload.load import expert_store_of, load_offloaded, parse_size
from dlmoe.offload.store import ExpertStore

__all__ = [
    "BudgetError",
    "CacheStats",
    "ExpertCache",
    "ExpertStore",
    "OffloadError",
    "OffloadedExperts",
    "expert_store_of",
    "load_offloaded",
    "parse_size",
]
