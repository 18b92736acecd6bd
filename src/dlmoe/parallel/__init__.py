"""Scale-out on torch.distributed, applied to the single-device model from outside.

    state = init_parallel(config.parallel)        # torchrun env → process group + ("dp", "ep") mesh
    pmodel = parallelize(model, state)            # experts sharded over "ep", then DDP / FSDP2
    save_sharded_checkpoint(...) / load_sharded_checkpoint(...)   # DCP: any world size

Modules: `mesh` (layout, config agreement), `all_to_all` (differentiable exchange),
`expert_parallel` (`ShardedExperts`), `token_pool` (EC pool over the EP group), `data_parallel`
(DDP / FSDP2, expert gradients, global gradient clipping), `checkpoint` (DCP save / load / export).
Imported on demand: `import dlmoe` does not import torch.distributed.
"""

from dlmoe.parallel.data_parallel import ParallelModel, parallelize
from dlmoe.parallel.mesh import (
    DistributedError,
    ParallelState,
    check_same_config,
    init_parallel,
    launched_by_torchrun,
    shutdown,
)

__all__ = [
    "DistributedError",
    "ParallelModel",
    "ParallelState",
    "check_same_config",
    "init_parallel",
    "launched_by_torchrun",
    "parallelize",
    "shutdown",
]
