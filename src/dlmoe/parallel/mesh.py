"""The process layout of a `torchrun` launch: a DeviceMesh with data-parallel and expert-parallel dims.

    world = dp × ep;  mesh["dp", "ep"];  rank = dp_index · ep + ep_index

The EP groups are runs of `ep` consecutive ranks (one node's GPUs when ep ≤ GPUs per node, so the
all_to_all stays on the fast links); the dp groups join the ranks holding the same experts.
Every rank trains on its own slice of the global batch, so dense parameters are data parallel
over the whole world, and expert parameters over the dp dim only.

`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `launched_by_torchrun()`
tells `dlmoe train` to start the distributed path. gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dlmoe.config import ParallelConfig
from dlmoe.runtime import resolve_device

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """A collective failed or timed out (a rank died or hangs); raised on the surviving ranks."""


def launched_by_torchrun() -> bool:
    """True when the torchrun environment variables are set (even for a world of 1)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


@dataclass
class ParallelState:
    """Who this process is and how the world is split; built by `init_parallel`."""

    config: ParallelConfig
    rank: int
    world_size: int
    device: torch.device
    mesh: DeviceMesh  # 2-D ("dp", "ep")
    world_mesh: DeviceMesh  # 1-D over all ranks (dense FSDP2 sharding)

    @property
    def expert_parallel(self) -> int:
        return self.config.expert_parallel

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.config.expert_parallel

    @property
    def ep_rank(self) -> int:
        return self.mesh.get_local_rank("ep")

    @property
    def dp_rank(self) -> int:
        return self.mesh.get_local_rank("dp")

    @property
    def ep_group(self):
        return self.mesh.get_group("ep")

    @property
    def dp_group(self):
        return self.mesh.get_group("dp")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def all_reduce_sum(self, x: torch.Tensor, group=None) -> torch.Tensor:
        """Σ over the ranks of `group` (default: the world), returned as a new tensor."""
        total = x.clone()
        dist.all_reduce(total, group=group)
        return total

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=src)
        return box[0]


def check_layout(world_size: int, expert_parallel: int) -> None:
    if expert_parallel > world_size or world_size % expert_parallel:
        raise ValueError(
            f"parallel.expert_parallel={expert_parallel} does not divide the world size {world_size} "
            f"(allowed: a divisor of {world_size})"
        )


def init_parallel(config: ParallelConfig, device: str = "auto") -> ParallelState:
    """Join the torchrun process group and build the ("dp", "ep") mesh.

    `device`: "auto" = this rank's GPU (LOCAL_RANK) when CUDA is available, else the CPU."""
    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        raise ValueError(f"not launched by torchrun: environment variables {missing} are not set")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    check_layout(world_size, config.expert_parallel)
    use_cuda = resolve_device(device).type == "cuda"
    torch_device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(torch_device)
    backend = config.backend if config.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ValueError("parallel.backend='nccl' needs CUDA devices; use 'gloo' (or 'auto') on CPU")
    if not dist.is_initialized():
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=config.timeout_s)
        )
    ep = config.expert_parallel
    mesh = init_device_mesh(torch_device.type, (world_size // ep, ep), mesh_dim_names=("dp", "ep"))
    world_mesh = init_device_mesh(torch_device.type, (world_size,), mesh_dim_names=("world",))
    return ParallelState(config, rank, world_size, torch_device, mesh, world_mesh)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_same_config(config: dict[str, Any]) -> None:
    """Fail on every rank, with one message, when the ranks were given different run configs."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (digest, config))
    reference_digest, reference = gathered[0]
    differing = {}
    for rank, (other_digest, other) in enumerate(gathered):
        if other_digest != reference_digest:
            differing[rank] = _differences(reference, other)
    if differing:
        lines = "; ".join(f"rank {rank}: {', '.join(keys)}" for rank, keys in sorted(differing.items()))
        raise ValueError(
            f"the ranks were launched with different run configs (compared with rank 0): {lines}. "
            "Every rank must get the same config file and overrides"
        )


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for key in keys for d in _differences(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [f"{prefix[:-1]}={b!r} (rank 0: {a!r})"]
