"""Reading DCP's `.metadata` without letting it run code.

`dcp.load` reads `.metadata` with plain `pickle.load`: a file altered after saving could run
anything. `check_dcp_metadata` unpickles it first with an allow-list of the classes DCP metadata
is made of, and refuses entries DCP would unpickle with full pickle or data files outside `dcp/`.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint.metadata as dcp_metadata

from dlmoe.checkpoint.commit import DCP_DIR

DCP_METADATA = ".metadata"
_PATH_CLASSES = ("Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath")


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's `.metadata` (a plain pickle that `dcp.load` reads with `pickle.load`) allowing
    only the classes it is made of: DCP's metadata dataclasses, torch dtypes / Size / layouts, paths.
    Anything else (os.system, eval, builtins, ...) is refused, never called."""

    def find_class(self, module: str, name: str) -> Any:
        obj = None
        if module == dcp_metadata.__name__:
            obj = getattr(dcp_metadata, name, None)
            obj = obj if isinstance(obj, type) and obj.__module__ == module else None
        elif (module, name) in {
            ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
            ("torch.serialization", "_get_layout"),
            ("torch", "Size"),
            ("collections", "OrderedDict"),
        } or (module in ("pathlib", "pathlib._local") and name in _PATH_CLASSES):
            obj = super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            obj = getattr(torch, name)
        if obj is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP metadata")
        return obj


def check_dcp_metadata(path: Path, data: bytes) -> None:
    """Refuse a `.metadata` that would run code when DCP unpickles it, or that asks DCP to unpickle
    entries with full pickle (BytesStorageMetadata: DCP reads those with torch.load(weights_only=False);
    dlmoe saves only tensors), or that points DCP at files outside the checkpoint."""
    where = f"checkpoint {path}: {DCP_DIR}/{DCP_METADATA} cannot be loaded safely"
    advice = (
        f"it was not written by dlmoe or was altered after saving, and nothing in it was run (move {path} aside to "
        "resume from an earlier checkpoint)"
    )
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as error:  # UnpicklingError, EOFError, ...: one line either way
        raise ValueError(
            f"{where}: {str(error).splitlines()[0] if str(error) else type(error).__name__}; {advice}"
        ) from None
    if not isinstance(metadata, dcp_metadata.Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise ValueError(f"{where}: it holds a {type(metadata).__name__}, not DCP metadata; {advice}")
    pickled = sorted(
        k for k, v in metadata.state_dict_metadata.items() if not isinstance(v, dcp_metadata.TensorStorageMetadata)
    )
    if pickled:
        raise ValueError(f"{where}: entries {pickled[:3]} are not tensors (DCP would unpickle them); {advice}")
    for info in (metadata.storage_data or {}).values():
        relative = getattr(info, "relative_path", None)
        if not isinstance(relative, str) or Path(relative).name != relative or relative.startswith("."):
            raise ValueError(f"{where}: it names the data file {relative!r}, outside {DCP_DIR}/; {advice}")
