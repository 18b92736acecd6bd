"""Parallelise a single-device model from the outside: expert parallelism, then DDP or FSDP2.

Order (torchtitan's): shard the experts over the EP group, then wrap the dense parameters —
DDP (replicated, gradients all-reduced) or FSDP2 `fully_shard` per transformer block and at the
root (sharded over the whole world). The expert parameters are kept out of both (`ignored`):
their gradients already hold the contributions of every rank of the EP group (through the
all_to_all backward), and `sync_expert_gradients` adds those of the other dp replicas.

Gradient scale: each rank's loss is the mean over its own slice of the global batch, so the
global loss is (1/W) Σ_r loss_r. DDP and FSDP2 average the dense gradients over W ranks; an
expert gradient is Σ over the EP group already, so it is summed over dp and divided by W.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from dlmoe.model.transformer import Block
from dlmoe.parallel.all_to_all import CommStats
from dlmoe.parallel.expert_parallel import ShardedExperts, apply_expert_parallel
from dlmoe.parallel.mesh import ParallelState


@dataclass
class ParallelModel:
    """The parallelised model: `module` (checkpoint keys unchanged) and `forward_module` (what to call)."""

    module: nn.Module
    forward_module: nn.Module
    state: ParallelState
    comm_stats: CommStats = field(default_factory=CommStats)

    def expert_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.module.modules() if isinstance(m, ShardedExperts) for p in m.parameters(recurse=False)]

    @contextlib.contextmanager
    def gradient_sync(self, enabled: bool) -> Iterator[None]:
        """No dense-gradient communication inside (the first micro-batches of an accumulation)."""
        if enabled:
            yield
        elif isinstance(self.forward_module, DistributedDataParallel):
            with self.forward_module.no_sync():
                yield
        else:
            fsdp = [m for m in self.module.modules() if isinstance(m, FSDPModule)]
            for m in fsdp:
                m.set_requires_gradient_sync(False, recurse=False)
            try:
                yield
            finally:
                for m in fsdp:
                    m.set_requires_gradient_sync(True, recurse=False)

    @torch.no_grad()
    def sync_expert_gradients(self) -> None:
        """Expert gradients: Σ over the dp replicas, / world size (see the module docstring)."""
        state = self.state
        for param in self.expert_parameters():
            if param.grad is None:
                continue
            if state.data_parallel > 1:
                dist.all_reduce(param.grad, group=state.dp_group)
            param.grad.div_(state.world_size)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip to a global L2 norm over every rank's shard; returns the norm before clipping.

        Three kinds of gradients: FSDP2 shards (Σ of squares over the world), EP shards (Σ over the
        EP group; dp replicas are equal) and replicated DDP gradients (already complete)."""
        state = self.state
        experts = {id(p) for p in self.expert_parameters()}
        device = state.device
        sq_world, sq_ep, sq_full = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(3))
        grads = []
        for param in self.module.parameters():
            if param.grad is None:
                continue
            grad = param.grad
            grads.append(grad)
            if isinstance(grad, DTensor):
                sq_world += grad.to_local().double().pow(2).sum()
            elif id(param) in experts:
                sq_ep += grad.double().pow(2).sum()
            else:
                sq_full += grad.double().pow(2).sum()
        dist.all_reduce(sq_world)
        if state.expert_parallel > 1:
            dist.all_reduce(sq_ep, group=state.ep_group)
        total = (sq_world + sq_ep + sq_full).sqrt().float()
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in grads:
            (grad.to_local() if isinstance(grad, DTensor) else grad).mul_(scale.to(grad.dtype))
        return total


def parallelize(
    model: nn.Module, state: ParallelState, load: Callable[[nn.Module], None] | None = None
) -> ParallelModel:
    """Expert parallelism (when `parallel.expert_parallel` > 1), `load` (fill the weights of what this
    rank keeps; may materialise a meta model), the move to this rank's device, then DDP or FSDP2; in
    place. Build the model on the CPU or the meta device: the device gets only this rank's part."""
    config = state.config
    stats = CommStats()
    if config.expert_parallel > 1:
        apply_expert_parallel(
            model, state.ep_group, state.ep_rank, config.expert_parallel, ec_pool=config.ec_pool, stats=stats
        )
    if load is not None:  # e.g. a fine-tune's source weights: only this rank's experts are read
        load(model)
    model.to(state.device)  # after sharding: the device holds only this rank's experts
    experts = {p for m in model.modules() if isinstance(m, ShardedExperts) for p in m.parameters(recurse=False)}
    if config.data_parallel == "ddp":
        ignored = [name for name, p in model.named_parameters() if p in experts]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        # buffers are synced once, at init (all equal then); not at every forward: the expert-bias
        # counts are per rank until `update_expert_biases` all-reduces them
        device_ids = [state.device.index] if state.device.type == "cuda" else None
        forward_module = DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    else:
        # FSDP2 warns that a block returns views (its fresh K/V, returned for caching); nothing
        # modifies them in place, so the warning does not apply
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        for block in (m for m in model.modules() if isinstance(m, Block)):
            fully_shard(block, mesh=state.world_mesh, ignored_params={p for p in block.parameters() if p in experts})
        fully_shard(model, mesh=state.world_mesh, ignored_params=experts)
        forward_module = model
    return ParallelModel(model, forward_module, state, stats)
