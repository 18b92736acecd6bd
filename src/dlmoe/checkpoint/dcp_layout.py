"""Sharded checkpoints with `torch.distributed.checkpoint` (DCP): save at one world size, load at any.

Layout (the atomic step directory of `dlmoe.checkpoint.commit`, `layout: "dcp"` in meta.json):

    step_00000100/
        dcp/        .metadata + one __<rank>_0.distcp file per writing rank: model and optimizer
        state.pt    step, scheduler, data iterator, noise generator, RNG, optimizer hyper-parameters
        meta.json   sizes and sha256 of every file above; written LAST by rank 0

Every tensor is saved under its single-process name with its global shape: FSDP2 parameters are
DTensors already, and the expert-parallel shards are wrapped as DTensors (Shard(0) over "ep",
Replicate over "dp") — so DCP can reshard them for another world size, expert-parallel size or
for one process (`dcp.load` without a process group reads the full tensors). Optimizer moments
are keyed by parameter name, not by position, for the same reason.

A checkpoint written by one process (`layout: "safetensors"`) loads into a sharded model too:
every rank reads the full tensors and keeps its slice (`load_full_state`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from dlmoe._fs import fsync_path
from dlmoe.checkpoint.commit import (
    DCP_DIR,
    MODEL_FILE,
    STATE_FILE,
    begin_checkpoint,
    checkpoint_layout,
    finish_checkpoint,
    fsync_file,
    raise_save_failure,
    verified_bytes,
)
from dlmoe.checkpoint.dcp_metadata import DCP_METADATA, check_dcp_metadata
from dlmoe.checkpoint.state import check_weights_only, load_state_bytes, write_state_file
from dlmoe.parallel.expert_parallel import ShardedExperts
from dlmoe.parallel.mesh import ParallelState

_MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW state with the parameter's shape


# ---------------------------------------------------------------------------------------------------
# Name-keyed, globally-shaped state


def _expert_wrappers(model: nn.Module, parallel: ParallelState | None) -> dict[str, Any]:
    """name → function turning an EP-local [E/P, ...] tensor into a global [E, ...] DTensor."""
    if parallel is None:
        return {}
    wrappers = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, ShardedExperts):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            shape = (module.num_global_experts, *param.shape[1:])

            def wrap(local: Tensor, shape=shape) -> DTensor:
                return DTensor.from_local(
                    local,
                    parallel.mesh,
                    [Replicate(), Shard(0)],
                    run_check=False,
                    shape=shape,
                    stride=torch.empty(shape, device="meta").stride(),
                )

            wrappers[f"{module_name}.{param_name}"] = wrap
    return wrappers


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter an AdamW state (zeros, step 0) so a checkpoint can be loaded into it."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state[param]
            if not state:
                state["step"] = torch.tensor(0.0)
                for key in _MOMENTS:
                    state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, parallel: ParallelState | None) -> dict:
    """{"model": {name: tensor}, "optimizer": {name: {"step", "exp_avg", "exp_avg_sq"}}}, global shapes.

    The tensors share storage with the model and optimizer: `dcp.load` into it loads them in place."""
    wrappers = _expert_wrappers(model, parallel)
    model_state = {name: wrappers.get(name, lambda t: t)(t) for name, t in model.state_dict().items()}
    out: dict[str, Any] = {"model": model_state}
    if optimizer is not None:
        init_optimizer_state(optimizer)
        names = {id(p): name for name, p in model.named_parameters()}
        optim_state = {}
        for group in optimizer.param_groups:
            for param in group["params"]:
                name = names[id(param)]
                wrap = wrappers.get(name, lambda t: t)
                state = optimizer.state[param]
                optim_state[name] = {"step": state["step"], **{k: wrap(state[k]) for k in _MOMENTS}}
        out["optimizer"] = optim_state
    return out


def optimizer_hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """The param groups without their parameters (lr, betas, weight decay, initial_lr …)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def _restore_hyperparameters(optimizer: torch.optim.Optimizer, groups: list[dict]) -> None:
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"checkpoint has {len(groups)} optimizer param groups, the optimizer {len(optimizer.param_groups)}"
        )
    for group, saved in zip(optimizer.param_groups, groups, strict=True):
        group.update(saved)


# ---------------------------------------------------------------------------------------------------
# Saving


def save_sharded_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    parallel: ParallelState | None,
    *,
    keep_last: int,
) -> Path:
    """Every rank writes its shards; rank 0 writes `state` (+ optimizer hyper-parameters) and commits.

    `state` is the trainer state without the optimizer (identical on all ranks). Collective: every
    rank must call it. A failure on any rank removes the scratch directory on rank 0 and raises on
    every rank; earlier checkpoints are untouched."""
    main = parallel is None or parallel.is_main
    state = {**state, "step": step, "optimizer_groups": optimizer_hyperparameters(optimizer)}
    check_weights_only(state, "state")
    tmp = final = None
    error: BaseException | None = None
    if main:
        try:
            tmp, final = begin_checkpoint(run_dir, step)
        except BaseException as exc:
            error = exc
    if parallel is not None:
        tmp, final, failed = parallel.broadcast_object((tmp, final, error is not None))
        if failed and error is None:
            raise RuntimeError(f"saving checkpoint step {step} failed on rank 0 (creating {final})")
    if error is not None:  # nothing was created: nothing to clean up
        if not isinstance(error, Exception):
            raise error
        raise RuntimeError(f"saving checkpoint step {step} under {run_dir} failed ({error})") from error
    try:
        with warnings.catch_warnings():  # one process: DCP warns that it assumes one process, as asked
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(
                sharded_state(model, optimizer, parallel), checkpoint_id=str(tmp / DCP_DIR), no_dist=parallel is None
            )
    except BaseException as exc:
        error = exc
    if parallel is not None:
        failed = _any_rank(parallel, error is not None)
        if failed and error is None:
            error = RuntimeError("another rank failed to write its shard")
    if main and error is None:
        try:
            write_state_file(tmp / STATE_FILE, state)
            files = [f"{DCP_DIR}/{p.name}" for p in sorted((tmp / DCP_DIR).iterdir())]
            for name in files:  # DCP fsyncs its files; the metadata and the directory too, to be sure
                fsync_file(tmp / name)
            fsync_path(tmp / DCP_DIR)
            finish_checkpoint(tmp, final, step, [*files, STATE_FILE], layout="dcp", keep_last=keep_last)
        except BaseException as exc:
            error = exc
    if parallel is not None and _any_rank(parallel, error is not None) and error is None:
        error = RuntimeError("rank 0 failed to commit the checkpoint")
    if error is not None:
        if main:
            raise_save_failure(error, tmp, final, step)
        raise RuntimeError(f"saving checkpoint step {step} to {final} failed: {error}") from error
    return final


def _any_rank(parallel: ParallelState, failed: bool) -> bool:
    flag = torch.tensor([1.0 if failed else 0.0], device=parallel.device)
    dist.all_reduce(flag)
    return bool(flag.item() > 0)


# ---------------------------------------------------------------------------------------------------
# Loading


def load_sharded_checkpoint(
    path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, parallel: ParallelState | None
) -> dict:
    """Load a checkpoint of either layout into a (possibly sharded) model and optimizer; return its state.

    `parallel=None` is one process without a process group. Integrity (sizes, sha256) is checked
    first by `verified_bytes` / meta.json; keys and shapes are checked by DCP (a mismatch raises)."""
    path = Path(path)
    layout = checkpoint_layout(path)
    state = load_state_bytes(path, verified_bytes(path, STATE_FILE))  # weights_only; refusals are one line
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path}: {STATE_FILE} holds a {type(state).__name__}, not a state dict")
    targets = sharded_state(model, optimizer, parallel)
    if layout == "dcp":
        check_dcp_metadata(path, verified_bytes(path, f"{DCP_DIR}/{DCP_METADATA}"))  # before DCP unpickles it
        _check_dcp_keys(path, targets)
        with warnings.catch_warnings():  # one process: DCP warns that it assumes one process, as asked
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(targets, checkpoint_id=str(path / DCP_DIR), no_dist=parallel is None)
        if optimizer is not None:
            _restore_hyperparameters(optimizer, state["optimizer_groups"])
    else:
        full_model = safetensors.torch.load(verified_bytes(path, MODEL_FILE))
        load_full_state(targets["model"], full_model, f"checkpoint {path}")
        if optimizer is not None:
            saved = state["optimizer"]
            load_full_state(targets["optimizer"], _optimizer_by_name(model, optimizer, saved), f"checkpoint {path}")
            _restore_hyperparameters(
                optimizer, [{k: v for k, v in g.items() if k != "params"} for g in saved["param_groups"]]
            )
    return state


def _check_dcp_keys(path: Path, targets: dict) -> None:
    """Name missing / unexpected model tensors and shape mismatches before DCP loads anything."""
    metadata = dcp.FileSystemReader(str(path / DCP_DIR)).read_metadata().state_dict_metadata
    saved = {k.removeprefix("model."): tuple(v.size) for k, v in metadata.items() if k.startswith("model.")}
    expected = {k: tuple(v.shape) for k, v in targets["model"].items()}
    missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
    reshaped = [f"{k}: checkpoint {saved[k]} vs model {s}" for k, s in expected.items() if k in saved and saved[k] != s]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing keys {missing}, unexpected keys {unexpected}, "
            f"shape mismatches {reshaped}"
        )


def _optimizer_by_name(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """A single-process optimizer state dict (keyed by position) re-keyed by parameter name."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    positions = [i for group in saved["param_groups"] for i in group["params"]]
    if len(positions) != len(order):
        raise ValueError(f"checkpoint optimizer has {len(positions)} parameters, the model {len(order)}")
    return {name: saved["state"][i] for name, i in zip(order, positions, strict=True)}


def load_full_state(targets: dict, full: dict, where: str) -> None:
    """Copy full tensors into (possibly sharded) targets: each rank keeps its own slice."""
    flat_targets, flat_full = _flatten(targets), _flatten(full)
    missing = sorted(flat_targets.keys() - flat_full.keys())
    if missing:
        raise ValueError(f"{where} lacks {len(missing)} tensors the model needs: {missing[:10]}")
    for name, target in flat_targets.items():
        source = flat_full[name]
        shape = tuple(target.shape)
        if tuple(source.shape) != shape:
            raise ValueError(f"{where}: {name} has shape {tuple(source.shape)}, the model expects {shape}")
        if isinstance(target, DTensor):
            local = distribute_tensor(
                source.to(target.dtype), target.device_mesh, target.placements, src_data_rank=None
            )
            target.to_local().copy_(local.to_local())
        else:
            target.copy_(source)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Tensor]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def full_model_state(model: nn.Module, parallel: ParallelState) -> dict[str, Tensor]:
    """The single-process state dict (full experts, unsharded FSDP parameters), on every rank's CPU."""
    wrappers = _expert_wrappers(model, parallel)
    out = {}
    for name, tensor in model.state_dict().items():
        if name in wrappers:
            tensor = wrappers[name](tensor)
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        out[name] = tensor.detach().cpu()
    return out
