"""The one-process checkpoint layout: `model.safetensors` + `state.pt`, committed by `dlmoe.checkpoint.commit`.

Tied or shared tensors are stored as separate copies, so the file holds every key and
`load_state_dict(strict=True)` needs no tie logic. A sharded model loads this layout too
(`dlmoe.checkpoint.dcp_layout.load_sharded_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
from torch import Tensor, nn

from dlmoe._checks import check_int
from dlmoe.checkpoint.commit import (
    MODEL_FILE,
    STATE_FILE,
    begin_checkpoint,
    finish_checkpoint,
    fsync_file,
    raise_save_failure,
    read_meta,
    read_verified,
)
from dlmoe.checkpoint.state import check_weights_only, load_state_bytes, write_state_file


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, state: dict, *, keep_last: int = 3) -> Path:
    """Atomically write `<run_dir>/checkpoints/step_{step:08d}/` and return its path.

    `state` holds everything but the model: optimizer / scheduler state dicts, `capture_rng_state()`,
    data iterator state, extras. It may contain only tensors, dict / list / tuple / set, None, bool,
    int, float, complex, str, bytes, torch.dtype / device / Size (what torch.load(weights_only=True)
    reads); anything else raises ValueError before anything is written. If it has a "step" key it
    must equal `step`. Re-saving an existing step replaces it. Afterwards only the `keep_last` newest
    valid checkpoints up to `step` are kept. On failure (e.g. disk full) the temporary directory is
    removed, earlier checkpoints are untouched, and OSError (errno kept) or RuntimeError is raised.
    """
    check_int("step", step, low=0)
    check_int("keep_last", keep_last, low=1)
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict, got {type(state).__name__}")
    if "step" in state and state["step"] != step:
        raise ValueError(f"state['step'] = {state['step']!r} disagrees with step = {step}")
    check_weights_only(state, "state")
    tensors = _model_tensors(model)

    tmp, final = begin_checkpoint(run_dir, step)
    try:
        _write_checkpoint_files(tmp, step, tensors, {**state, "step": step})
        finish_checkpoint(tmp, final, step, [MODEL_FILE, STATE_FILE], keep_last=keep_last)
    except BaseException as error:
        raise_save_failure(error, tmp, final, step)
    return final


def _model_tensors(model: nn.Module) -> dict[str, Tensor]:
    """CPU, contiguous copies-as-needed of model.state_dict() that safetensors accepts.

    safetensors refuses tensors sharing storage (tied embeddings, views of one buffer); those get
    their own copy, so the file holds every key and load_state_dict(strict=True) needs no tie logic.
    """
    tensors: dict[str, Tensor] = {}
    seen_storages: set[tuple[str, int]] = set()
    for name, value in model.state_dict().items():
        if not isinstance(value, Tensor):
            raise ValueError(f"model.state_dict()[{name!r}] is a {type(value).__name__}, not a tensor")
        tensor = value.detach().cpu().contiguous()
        storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
        if storage in seen_storages:
            tensor = tensor.clone()
        seen_storages.add(storage)
        tensors[name] = tensor
    return tensors


def _write_checkpoint_files(directory: Path, step: int, tensors: dict[str, Tensor], state: dict) -> None:
    """model.safetensors and state.pt, each fsync-ed."""
    safetensors.torch.save_file(tensors, str(directory / MODEL_FILE), metadata={"step": str(step)})
    fsync_file(directory / MODEL_FILE)
    write_state_file(directory / STATE_FILE, state)


def load_checkpoint(path: str | Path, model: nn.Module) -> dict:
    """Verify the checkpoint at `path`, load its weights into `model` and return its state dict.

    The returned dict is the `state` given to `save_checkpoint`, with "step" set. Every file is read
    into memory and checked (sizes, sha256, parse, matching keys and shapes) before the model is
    touched, so a bad checkpoint raises ValueError naming `path` and the problem and leaves `model`
    unchanged. Tensors in the state are on CPU; optimizer.load_state_dict moves them to the params.
    """
    path = Path(path)
    meta = read_meta(path)
    if meta.get("layout", "safetensors") != "safetensors":
        raise ValueError(
            f"checkpoint {path} is sharded (layout {meta['layout']!r}); load it with "
            "dlmoe.checkpoint.load_sharded_checkpoint (the trainer does this on --resume)"
        )
    blobs = {name: read_verified(path, name, meta["files"][name]) for name in (MODEL_FILE, STATE_FILE)}
    try:
        tensors = safetensors.torch.load(blobs[MODEL_FILE])
    except Exception as error:
        raise ValueError(f"checkpoint {path}: {MODEL_FILE} cannot be parsed: {error}") from error
    state = load_state_bytes(path, blobs[STATE_FILE])
    if not isinstance(state, dict) or state.get("step") != meta["step"]:
        raise ValueError(f"checkpoint {path}: {STATE_FILE} is not a state dict for step {meta['step']}")
    _check_matches_model(path, tensors, model)
    model.load_state_dict(tensors, strict=True)
    return state


def _check_matches_model(path: Path, tensors: dict[str, Tensor], model: nn.Module) -> None:
    """load_state_dict copies what it can before complaining, so mismatches are caught here first."""
    expected = {name: tuple(value.shape) for name, value in model.state_dict().items()}
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    reshaped = [
        f"{name}: checkpoint {tuple(tensors[name].shape)} vs model {shape}"
        for name, shape in expected.items()
        if name in tensors and tuple(tensors[name].shape) != shape
    ]
    if missing or unexpected or reshaped:
        raise ValueError(
            f"checkpoint {path} does not match the model: missing keys {missing}, unexpected keys {unexpected}, "
            f"shape mismatches {reshaped}"
        )
