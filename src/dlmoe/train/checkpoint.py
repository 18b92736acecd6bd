"""Atomic, integrity-checked training checkpoints.

Layout, one directory per saved step:

    <run_dir>/checkpoints/step_00001000/
        model.safetensors   model.state_dict() (tied / shared tensors stored as separate copies)
        state.pt            the caller's `state` dict (optimizer, scheduler, RNG, data iterator, extras)
                            plus "step"; torch.save, read back with torch.load(weights_only=True)
        meta.json           step, time, size and sha256 of the two files above; written LAST

Why this shape:
- Everything is written into `checkpoints/.tmp-step_<8-digit step>-<pid>`, every file and the directory are
  fsync-ed, and only then is the directory renamed to its final name (rename within one filesystem is
  atomic on POSIX). A crash or a full disk therefore leaves either a complete checkpoint or a `.tmp-*`
  directory that is never mistaken for one and is removed by the next save.
- meta.json is the commit record: a step directory without it, or whose files do not match its sizes
  and hashes, is invalid. `latest_checkpoint` skips invalid ones and `load_checkpoint` refuses them.
- `state.pt` is loaded with weights_only=True, so a checkpoint cannot execute code when loaded. The
  price is that `state` may hold only tensors, plain containers, numbers, strings and a few torch
  types; anything else is rejected when saving (ValueError), not discovered at resume time.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor, nn

from dlmoe._checks import check_int
from dlmoe._fs import fsync_path, pid_alive, remove_stale_scratch, replace_folder

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the layout changes, so old checkpoints are not misread
CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
META_FILE = "meta.json"
DCP_DIR = "dcp"  # torch.distributed.checkpoint files of a sharded (torchrun) checkpoint
# files each layout must list in meta.json: "safetensors" (one process), "dcp" (sharded, any world size)
REQUIRED_FILES = {"safetensors": (MODEL_FILE, STATE_FILE), "dcp": (STATE_FILE, f"{DCP_DIR}/.metadata")}
_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_SCRATCH_DIR = re.compile(r"^\.(?:tmp|old)-step_\d{8,}-(\d+)$")  # .tmp-* being written, .old-* being replaced

# Exactly what torch.load(weights_only=True) accepts (checked by the tests). Exact types, not
# isinstance: np.float64 subclasses float and a namedtuple subclasses tuple, yet both are rejected.
_LEAF_TYPES = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.device, torch.Size)
_CONTAINER_TYPES = (dict, collections.OrderedDict, list, tuple, set)
_TENSOR_TYPES = (Tensor, nn.Parameter)


# ---------------------------------------------------------------------------------------------------
# RNG state


def capture_rng_state() -> dict[str, Any]:
    """Global RNG states of python `random`, numpy, torch CPU and (when available) every CUDA device.

    Only weights_only-loadable values: numpy's state array becomes a list of ints.
    """
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    rng = {
        "python": random.getstate(),
        "numpy": {
            "name": str(name),
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng_state(rng: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`. CUDA states are skipped (with a warning) when CUDA is absent."""
    missing = {"python", "numpy", "torch"} - set(rng)
    if missing:
        raise ValueError(f"rng state is missing {sorted(missing)}; expected the dict from capture_rng_state()")
    version, internal, gauss_next = rng["python"]
    random.setstate((version, tuple(internal), gauss_next))
    state_np = rng["numpy"]
    keys = np.asarray(state_np["keys"], dtype=np.uint32)
    np.random.set_state((state_np["name"], keys, state_np["pos"], state_np["has_gauss"], state_np["cached_gaussian"]))
    torch.set_rng_state(rng["torch"].cpu())
    if "cuda" in rng:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
        else:
            logger.warning("checkpoint holds CUDA RNG states but CUDA is not available; not restoring them")


# ---------------------------------------------------------------------------------------------------
# Saving


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


def begin_checkpoint(run_dir: str | Path, step: int, *, tag: int | None = None) -> tuple[Path, Path]:
    """Create the scratch directory `checkpoints/.tmp-step_<step>-<tag>` (tag: this pid); return it
    and the final `step_<step>` path. Stale scratch directories of dead processes are removed."""
    ckpt_root = Path(run_dir) / CHECKPOINTS
    ckpt_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_scratch(ckpt_root)
    final = ckpt_root / f"step_{step:08d}"
    tmp = ckpt_root / f".tmp-step_{step:08d}-{os.getpid() if tag is None else tag}"
    tmp.mkdir()
    return tmp, final


def finish_checkpoint(
    tmp: Path, final: Path, step: int, files: list[str], *, layout: str = "safetensors", keep_last: int
) -> None:
    """Commit a checkpoint whose `files` (paths relative to `tmp`) are written and fsync-ed:
    meta.json with their sizes and sha256 (the commit record, written last), rename into place,
    prune to `keep_last`."""
    # Hash what is on disk (read back), not what we meant to write.
    meta = {
        "format_version": FORMAT_VERSION,
        "layout": layout,
        "step": step,
        "time": time.time(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {name: _describe_file(tmp / name) for name in files},
    }
    with open(tmp / META_FILE, "w") as handle:
        json.dump(meta, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_path(tmp)
    replace_folder(tmp, final)
    _prune(final.parent, newest=final, keep_last=keep_last)


def raise_save_failure(error: BaseException, tmp: Path, final: Path, step: int) -> None:
    """Remove the scratch directory and re-raise `error` as OSError / RuntimeError naming the step.

    A full disk (ENOSPC, or how torch.save / safetensors word it) becomes OSError(ENOSPC, "disk full
    while writing <step dir> (...); earlier checkpoints are intact (free space and rerun with --resume)")."""
    shutil.rmtree(tmp, ignore_errors=True)
    if not isinstance(error, Exception):  # KeyboardInterrupt / SystemExit pass through unchanged
        raise error
    if is_disk_full(error):
        detail = error.strerror if isinstance(error, OSError) and error.strerror else _first_line(error)
        raise OSError(errno.ENOSPC, disk_full_message(final, f"checkpoint step {step}: {detail}")) from error
    message = f"saving checkpoint step {step} to {final} failed ({error}); earlier checkpoints are untouched"
    if isinstance(error, OSError):
        raise OSError(error.errno, message) from error
    raise RuntimeError(message) from error


# how torch.save (PyTorchStreamWriter) and safetensors report a full disk without an errno
_DISK_FULL_WORDING = ("file write failed", "No space left on device", "StorageFull", "Disk quota exceeded")


def is_disk_full(error: BaseException) -> bool:
    """Whether `error`, or an error it was raised from, is a full disk: OSError ENOSPC / EDQUOT, or
    torch.save's RuntimeError ("... file write failed", "inline_container.cc ... unexpected pos")."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(current)
        if any(words in text for words in _DISK_FULL_WORDING) or (
            "inline_container" in text and "unexpected pos" in text
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


def disk_full_message(path: str | Path | None, detail: str | None = None) -> str:
    """The one line a full disk is reported as."""
    where = f" {path}" if path is not None else " the run's files"
    return (
        f"disk full while writing{where}{f' ({detail})' if detail else ''}; earlier checkpoints are intact "
        "(free space and rerun with --resume)"
    )


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


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


def check_weights_only(value: Any, where: str) -> None:
    """Raise ValueError naming the first value torch.load(weights_only=True) would refuse."""
    kind = type(value)
    if kind in _TENSOR_TYPES or kind in _LEAF_TYPES:
        return
    if kind not in _CONTAINER_TYPES:
        hint = " (convert numpy scalars with .item())" if isinstance(value, np.generic) else ""
        raise ValueError(
            f"{where} is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) cannot "
            f"read back{hint}; checkpoint state may hold only tensors, dict/list/tuple/set, None, bool, int, "
            f"float, complex, str, bytes and torch.dtype/device/Size"
        )
    if kind in (dict, collections.OrderedDict):
        for key, item in value.items():
            check_weights_only(key, f"{where} key {key!r}")
            check_weights_only(item, f"{where}[{key!r}]")
    else:
        for index, item in enumerate(value):
            check_weights_only(item, f"{where}[{index}]")


def _write_checkpoint_files(directory: Path, step: int, tensors: dict[str, Tensor], state: dict) -> None:
    """model.safetensors and state.pt, each fsync-ed."""
    safetensors.torch.save_file(tensors, str(directory / MODEL_FILE), metadata={"step": str(step)})
    fsync_file(directory / MODEL_FILE)
    write_state_file(directory / STATE_FILE, state)


def write_state_file(path: Path, state: dict) -> None:
    """torch.save(state) (weights_only-loadable, checked by the caller), fsync-ed."""
    with open(path, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _remove_stale_scratch(ckpt_root: Path) -> None:
    """Delete `.tmp-*` / `.old-*` directories left by this pid or by processes that no longer exist."""
    for entry in ckpt_root.iterdir():
        match = _SCRATCH_DIR.match(entry.name)
        if match is None or not entry.is_dir():
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and pid_alive(pid):
            continue  # another live process may be writing it right now
        logger.info("removing stale checkpoint scratch directory %s", entry)
        shutil.rmtree(entry, ignore_errors=True)
    remove_stale_scratch(ckpt_root)  # `.step_*.old-<pid>` left by an interrupted re-save


def _prune(ckpt_root: Path, *, newest: Path, keep_last: int) -> None:
    """Keep the `keep_last` newest valid step dirs up to `newest`; delete older valid and invalid ones.

    Step dirs beyond `newest` (e.g. left by a run that was rewound) are never touched here.
    Validity is checked by sizes only (cheap); hashes are checked when a checkpoint is chosen/loaded.
    """
    newest_step = _step_of(newest)
    num_kept = 0
    for path in reversed(_step_dirs(ckpt_root)):
        if _step_of(path) > newest_step:
            continue
        if path == newest or (num_kept < keep_last and _checkpoint_problem(path, hashes=False) is None):
            num_kept += 1
            continue
        logger.info("pruning checkpoint %s", path)
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Finding and loading


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest valid `<run_dir>/checkpoints/step_*` (meta.json present, sizes and sha256 match), or None.

    Invalid ones are skipped with a warning naming the problem. Hashing reads every file once.
    """
    ckpt_root = Path(run_dir) / CHECKPOINTS
    if not ckpt_root.is_dir():
        return None
    for path in reversed(_step_dirs(ckpt_root)):
        problem = _checkpoint_problem(path, hashes=True)
        if problem is None:
            return path
        logger.warning("skipping invalid checkpoint %s: %s", path, problem)
    return None


def checkpoint_layout(path: str | Path) -> str:
    """ "safetensors" (written by one process) or "dcp" (sharded, written by a torchrun launch)."""
    return _read_meta(Path(path)).get("layout", "safetensors")


def load_checkpoint(path: str | Path, model: nn.Module) -> dict:
    """Verify the checkpoint at `path`, load its weights into `model` and return its state dict.

    The returned dict is the `state` given to `save_checkpoint`, with "step" set. Every file is read
    into memory and checked (sizes, sha256, parse, matching keys and shapes) before the model is
    touched, so a bad checkpoint raises ValueError naming `path` and the problem and leaves `model`
    unchanged. Tensors in the state are on CPU; optimizer.load_state_dict moves them to the params.
    """
    path = Path(path)
    meta = _read_meta(path)
    if meta.get("layout", "safetensors") != "safetensors":
        raise ValueError(
            f"checkpoint {path} is sharded (layout {meta['layout']!r}); load it with "
            "dlmoe.parallel.checkpoint.load_sharded_checkpoint (the trainer does this on --resume)"
        )
    blobs = {name: _read_verified(path, name, meta["files"][name]) for name in (MODEL_FILE, STATE_FILE)}
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


def load_state_bytes(path: Path, data: bytes) -> Any:
    """The state.pt of the checkpoint at `path` (its verified bytes), read with torch.load(weights_only=True).

    Nothing in the file can run: only a torch.save zip archive is handed to torch's weights-only
    unpickler, which refuses every class and function outside tensors and plain containers. Any
    refusal (a pickle calling os.system, a custom class, a truncated archive) is ONE-line ValueError
    naming the checkpoint, never torch's multi-line advice to retry with weights_only=False."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        reason = "it is not a torch.save archive (truncated, corrupt, or a raw pickle, which is never unpickled)"
    else:
        try:
            with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise next to the refusal below
                warnings.simplefilter("ignore")
                return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as error:  # UnpicklingError, RuntimeError (bad archive), EOFError, ...
            reason = _weights_only_refusal(error)
    raise ValueError(
        f"checkpoint {path}: {STATE_FILE} cannot be loaded safely (weights_only): {reason}; it was not written by "
        f"dlmoe or was altered after saving, and nothing in it was run (move {path} aside to resume from an earlier "
        "checkpoint)"
    )


def _weights_only_refusal(error: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in a few words."""
    text = str(error)
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if found:
        return f"it references {found.group(1)}, which is not a tensor or plain container"
    found = re.search(r"Unsupported operand \d+", text)
    if found:
        return f"it holds pickle instructions that only code-running pickles use ({found.group(0)})"
    if isinstance(error, pickle.UnpicklingError):
        return "it holds objects other than tensors and plain containers"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    return f"the archive cannot be read ({first.split('. ')[0]})"


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


def _checkpoint_problem(path: Path, *, hashes: bool) -> str | None:
    """None if the checkpoint at `path` is intact, else a description of what is wrong."""
    try:
        meta = _read_meta(path)
        for name, expected in meta["files"].items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            size = file.stat().st_size
            if size != expected["size"]:
                return f"{name} has {size} bytes, meta.json records {expected['size']} (truncated or overwritten)"
            if hashes and _sha256_file(file) != expected["sha256"]:
                return f"{name} sha256 does not match meta.json (corrupt)"
    except (ValueError, OSError) as error:
        return str(error)
    return None


def _read_meta(path: Path) -> dict:
    meta_path = path / META_FILE
    if not path.is_dir():
        raise ValueError(f"checkpoint {path} is not a directory")
    if not meta_path.is_file():
        raise ValueError(f"checkpoint {path}: {META_FILE} is missing (the save never completed)")
    try:
        meta = json.loads(meta_path.read_text())
        files = meta["files"]
        required = REQUIRED_FILES[meta.get("layout", "safetensors")]
        ok = isinstance(meta["step"], int) and all(
            isinstance(files[name]["size"], int) and isinstance(files[name]["sha256"], str) for name in required
        )
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"checkpoint {path}: {META_FILE} is unreadable or incomplete ({error!r})") from error
    if not ok:
        raise ValueError(f"checkpoint {path}: {META_FILE} has malformed step/files entries")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"checkpoint {path}: format_version {meta.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    return meta


def verified_bytes(path: str | Path, name: str) -> bytes:
    """The bytes of one file of the checkpoint at `path`, checked against its meta.json entry."""
    path = Path(path)
    meta = _read_meta(path)
    if name not in meta["files"]:
        raise ValueError(f"checkpoint {path}: meta.json lists no {name!r}")
    return _read_verified(path, name, meta["files"][name])


def _read_verified(path: Path, name: str, expected: dict) -> bytes:
    """The bytes of `path / name`, after checking them against meta.json's size and sha256."""
    try:
        data = (path / name).read_bytes()
    except FileNotFoundError as error:
        raise ValueError(f"checkpoint {path}: {name} is missing") from error
    if len(data) != expected["size"]:
        raise ValueError(
            f"checkpoint {path}: {name} has {len(data)} bytes, meta.json records {expected['size']} "
            "(truncated or overwritten)"
        )
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise ValueError(f"checkpoint {path}: {name} sha256 does not match meta.json (corrupt)")
    return data


# ---------------------------------------------------------------------------------------------------
# Small filesystem helpers


def _step_dirs(ckpt_root: Path) -> list[Path]:
    """`step_*` directories under `ckpt_root`, oldest step first."""
    found = [entry for entry in ckpt_root.iterdir() if _STEP_DIR.match(entry.name) and entry.is_dir()]
    return sorted(found, key=_step_of)


def _step_of(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def _describe_file(file: Path) -> dict[str, Any]:
    return {"size": file.stat().st_size, "sha256": _sha256_file(file)}


def _sha256_file(file: Path, chunk_bytes: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(file: Path) -> None:
    with open(file, "rb") as handle:
        os.fsync(handle.fileno())
