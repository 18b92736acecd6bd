"""What a checkpoint's `state.pt` may hold, and the RNG state it carries.

`state.pt` is loaded with torch.load(weights_only=True), so a checkpoint cannot execute code when
loaded. The price is that the state may hold only tensors, plain containers, numbers, strings and
a few torch types; anything else is refused when saving (`check_weights_only`), not discovered at
resume time.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import pickle
import random
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from dlmoe.checkpoint.commit import STATE_FILE

logger = logging.getLogger(__name__)

# Exactly what torch.load(weights_only=True) accepts (checked by the tests). Exact types, not
# isinstance: np.float64 subclasses float and a namedtuple subclasses tuple, yet both are rejected.
_LEAF_TYPES = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.dtype, torch.device, torch.Size)
_CONTAINER_TYPES = (dict, collections.OrderedDict, list, tuple, set)
_TENSOR_TYPES = (Tensor, nn.Parameter)


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


def write_state_file(path: Path, state: dict) -> None:
    """torch.save(state) (weights_only-loadable, checked by the caller), fsync-ed."""
    with open(path, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())


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
