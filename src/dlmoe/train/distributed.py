"""What the trainer does differently on one process and on a torchrun world.

`LocalRuntime` is one process: the trainer's code path is the plain one. `DistributedRuntime`
wraps a `ParallelState`: each rank trains on its rows of the global batch (`train.batch_size` is
global), the model is parallelised from outside (`dlmoe.parallel.parallelize`), scalars are
averaged over ranks, only rank 0 writes files, and checkpoints are sharded (DCP). A collective that
fails (a rank died) or times out becomes a `DistributedError` naming the last checkpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from dlmoe._fs import staged_folder
from dlmoe.checkpoint import checkpoint_layout, latest_checkpoint, load_checkpoint, save_checkpoint
from dlmoe.config import RunConfig
from dlmoe.config_io import run_config_to_dict

T = TypeVar("T")


class LocalRuntime:
    """One process, no process group."""

    rank, world_size, is_main = 0, 1, True
    device: torch.device | None = None  # None: train.device decides
    forward_module: nn.Module

    def check_config(self, config: RunConfig) -> None:
        """Fail (on every rank) when the ranks were given different configs or the layout does not fit."""

    def setup(
        self, model: nn.Module, device: torch.device, load: Callable[[nn.Module], None] | None = None
    ) -> nn.Module:
        """The model to train, on `device` (parallelised), after `load` filled its weights (a meta
        model is materialised by it); sets `forward_module`, what a training step calls."""
        if load is not None:
            load(model)
        self.forward_module = model.to(device)
        return self.forward_module

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        yield

    def local_rows(self, batch: Tensor) -> Tensor:
        return batch

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def finish_gradients(self) -> None:
        """One process: the gradients are complete after backward (nothing to reduce)."""

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    reduce_counts = None  # expert-bias counts are this process's own

    def mean(self, values: list[float]) -> list[float]:
        return values

    def sum(self, x: Tensor) -> Tensor:
        return x

    def save_checkpoint(self, run_dir: Path, step: int, model, optimizer, state: dict, keep_last: int) -> Path:
        return save_checkpoint(
            run_dir, step, model, {**state, "optimizer": optimizer.state_dict()}, keep_last=keep_last
        )

    def load_checkpoint(self, path: Path, model, optimizer=None) -> dict:
        """Model (and optimizer, when given) from a checkpoint of either layout; returns its state."""
        if checkpoint_layout(path) == "dcp":  # written by a torchrun launch: any world size loads it
            from dlmoe.checkpoint.dcp_layout import load_sharded_checkpoint

            return load_sharded_checkpoint(path, model, optimizer, None)
        state = load_checkpoint(path, model)
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        return state

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the main process only and give every process its result (or its ValueError)."""
        return fn()

    def save_model(self, model, directory: Path, tokenizer) -> None:
        """The model and its tokenizer as one Hugging Face folder, staged and renamed into place
        (a kill while saving leaves the previous model folder, or none)."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # transformers' "Writing model shards" bar is noise here
        try:
            with staged_folder(directory, replace=True) as scratch:
                model.save_pretrained(scratch)
                tokenizer.save_pretrained(scratch)
        finally:
            hf_logging.enable_progress_bar()

    @contextlib.contextmanager
    def guard(self, run_dir: Path) -> Iterator[None]:
        yield


class DistributedRuntime(LocalRuntime):
    """A rank of a torchrun world (see `dlmoe.parallel`)."""

    def __init__(self, state) -> None:
        self.state = state
        self.rank, self.world_size, self.is_main = state.rank, state.world_size, state.is_main
        self.device = state.device
        self.parallel_model = None

    def check_config(self, config: RunConfig) -> None:
        from dlmoe.parallel import check_same_config

        check_same_config(run_config_to_dict(config))
        ep = config.parallel.expert_parallel
        num_experts = config.model.moe.router.num_experts if config.model.moe is not None else None
        if num_experts is not None and num_experts % ep:
            raise ValueError(
                f"model.moe.router.num_experts={num_experts} is not divisible by parallel.expert_parallel={ep}; "
                f"allowed: expert_parallel dividing {num_experts} (and the world size {self.world_size})"
            )

    def setup(
        self, model: nn.Module, device: torch.device, load: Callable[[nn.Module], None] | None = None
    ) -> nn.Module:
        from dlmoe.parallel import parallelize  # shards the experts, loads, moves to the device, wraps

        self.parallel_model = parallelize(model, self.state, load)
        self.forward_module = self.parallel_model.forward_module
        return self.parallel_model.module

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (tokenizer training, token cache), then the others reuse it."""
        if self.is_main:
            yield
        self.state.barrier()
        if not self.is_main:
            yield

    def local_rows(self, batch: Tensor) -> Tensor:
        """This rank's equal share of the rows (training batches divide evenly; the remainder of a
        short last validation batch is left out, the same rows on every rank)."""
        rows = batch.shape[0] // self.world_size
        return batch[self.rank * rows : (self.rank + 1) * rows]

    def gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        return self.parallel_model.gradient_sync(enabled)

    def finish_gradients(self) -> None:
        self.parallel_model.sync_expert_gradients()

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        return self.parallel_model.clip_grad_norm_(max_norm)

    def reduce_counts(self, counts: Tensor) -> Tensor:
        return self.state.all_reduce_sum(counts)

    def mean(self, values: list[float]) -> list[float]:
        total = self.state.all_reduce_sum(torch.tensor(values, dtype=torch.float64, device=self.state.device))
        return (total / self.world_size).tolist()

    def sum(self, x: Tensor) -> Tensor:
        return self.state.all_reduce_sum(x.to(self.state.device)).to(x.device)

    def save_checkpoint(self, run_dir: Path, step: int, model, optimizer, state: dict, keep_last: int) -> Path:
        from dlmoe.checkpoint.dcp_layout import save_sharded_checkpoint

        return save_sharded_checkpoint(run_dir, step, model, optimizer, state, self.state, keep_last=keep_last)

    def load_checkpoint(self, path: Path, model, optimizer) -> dict:
        from dlmoe.checkpoint.dcp_layout import load_sharded_checkpoint

        return load_sharded_checkpoint(path, model, optimizer, self.state)

    def on_main(self, fn: Callable[[], T]) -> T:
        """Rank 0 runs `fn`; every rank returns its result, or raises the same ValueError."""
        outcome: tuple[bool, Any] = (True, None)
        if self.is_main:
            try:
                outcome = (True, fn())
            except ValueError as error:
                outcome = (False, str(error))
        gathered: list[Any] = [outcome]
        torch.distributed.broadcast_object_list(gathered, src=0)
        ok, value = gathered[0]
        if not ok:
            raise ValueError(value)
        return value

    def save_model(self, model, directory: Path, tokenizer) -> None:
        """Rank 0 writes the single-process model (full experts) and the tokenizer: what `dlmoe sample` loads."""
        from dlmoe.checkpoint.dcp_layout import full_model_state
        from dlmoe.model.hf import DlmoeForDiffusionLM

        tensors = full_model_state(model, self.state)
        if self.is_main:
            with torch.device("meta"):
                full = DlmoeForDiffusionLM(model.config)
            full.load_state_dict(tensors, assign=True)
            full.tie_weights()
            super().save_model(full, directory, tokenizer)
        self.state.barrier()

    @contextlib.contextmanager
    def guard(self, run_dir: Path) -> Iterator[None]:
        """Turn a failed or timed-out collective into a DistributedError that says what to do."""
        from dlmoe.parallel import DistributedError

        try:
            yield
        except (RuntimeError, OSError) as error:
            if isinstance(error, DistributedError) or not _is_comm_failure(error):
                raise
            last = latest_checkpoint(run_dir)
            where = f"the last complete checkpoint is {last}" if last else "no checkpoint was completed yet"
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: a collective failed or timed out (parallel.timeout_s="
                f"{self.state.config.timeout_s:g} s) — another rank probably died or hangs "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). {where.capitalize()}; "
                "it loads at any world size: relaunch with --resume"
            ) from error


def _is_comm_failure(error: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return any(
        word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "closed")
    )
