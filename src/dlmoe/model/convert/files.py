"""A Hugging Face checkpoint folder on disk: config.json + safetensors shards (+ index), read lazily.

`CheckpointFiles.open` reads only the JSON and the shard headers (names, shapes, dtypes); a
tensor is read when asked for, through safetensors' memory map, so importing a 16B checkpoint
holds one copy of the weights in RAM (the model's), not two. Everything that can be checked
without reading the weights is checked at open: the config parses, every shard the index names
exists and is complete (a truncated file fails its header check), and the index agrees with the
shards. `write_shards` is the inverse (export).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from dlmoe import _fs

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be imported: says what is wrong and where."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class CheckpointFiles:
    """The config and the tensor directory of a checkpoint folder; tensors are read on demand."""

    def __init__(self, folder: Path, config: dict[str, Any], tensors: dict[str, TensorInfo]) -> None:
        self.folder, self.config, self.tensors = folder, config, tensors
        self._handles: dict[str, Any] = {}
        self._unread: dict[str, set[str]] = {}
        for name, info in tensors.items():
            self._unread.setdefault(info.file, set()).add(name)

    @classmethod
    def open(cls, folder: str | os.PathLike) -> CheckpointFiles:
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{str(folder)!r} is not a folder (expected a checkpoint folder with config.json)")
        config_path = folder / CONFIG_FILE
        if not config_path.is_file():
            raise CheckpointError(f"{str(folder)!r} is not a checkpoint: it has no {CONFIG_FILE}")
        try:
            config = json.loads(config_path.read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(f"{config_path} is not valid JSON: {error}") from error
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
        return cls(folder, config, _tensor_directory(folder))

    def read(self, name: str, rows: slice | None = None) -> Tensor:
        """One tensor (or only `rows` of its first dim) from its memory-mapped shard. A shard is
        unmapped once all its tensors were read, so the mapped file pages of at most the shards in
        use count towards the process."""
        file = self.tensors[name].file
        if file not in self._handles:
            self._handles[file] = safe_open(self.folder / file, framework="pt").__enter__()
        handle = self._handles[file]
        tensor = handle.get_tensor(name) if rows is None else handle.get_slice(name)[rows]
        unread = self._unread[file]
        unread.discard(name)
        if not unread:
            self._handles.pop(file).__exit__(None, None, None)
        return tensor

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()

    def __enter__(self) -> CheckpointFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _tensor_directory(folder: Path) -> dict[str, TensorInfo]:
    """name → (shard, shape, dtype) from the shard headers, checked against the index if there is one."""
    index_path = folder / INDEX_FILE
    expected_files: dict[str, str] | None = None
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (OSError, ValueError, KeyError, TypeError, AssertionError) as error:
            raise CheckpointError(
                f"{index_path} is not a safetensors index (no 'weight_map' object): {error}"
            ) from error
        expected_files = weight_map
        shard_names = sorted(set(weight_map.values()))
        missing = [name for name in shard_names if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(f"{index_path} names shard files that do not exist in {folder}: {missing}")
    else:
        shard_names = sorted(p.name for p in folder.glob("*.safetensors"))
        if not shard_names:
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
            if pickles:
                raise CheckpointError(
                    f"{str(folder)!r} holds {pickles[0]} (a pickle); dlmoe reads only safetensors — pickled "
                    "weights can run code when loaded, so they are never opened (convert them to safetensors "
                    "with a tool you trust)"
                )
            raise CheckpointError(f"{str(folder)!r} is not a checkpoint: no {INDEX_FILE} and no *.safetensors files")
    tensors: dict[str, TensorInfo] = {}
    for shard in shard_names:
        for name, info in _read_header(folder / shard).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} is stored twice: in {tensors[name].file} and in {shard}")
            tensors[name] = info
    if expected_files is not None:
        misplaced = sorted(n for n, f in expected_files.items() if n not in tensors or tensors[n].file != f)
        unlisted = sorted(set(tensors) - set(expected_files))
        if misplaced or unlisted:
            raise CheckpointError(
                f"{index_path} disagrees with the shards: tensors listed but not found in their shard "
                f"{misplaced[:20]}, tensors in the shards but not in the index {unlisted[:20]}"
            )
    return tensors


def _read_header(path: Path) -> dict[str, TensorInfo]:
    try:
        with safe_open(path, framework="pt") as handle:
            out = {}
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                tensor_slice = handle.get_slice(name)
                out[name] = TensorInfo(
                    path.name, tuple(tensor_slice.get_shape()), SAFETENSORS_DTYPES[tensor_slice.get_dtype()]
                )
            return out
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"shard {path} cannot be read (truncated or not a safetensors file): {error}") from error
    except KeyError as error:
        raise CheckpointError(f"shard {path} holds a tensor of unsupported dtype {error}") from error


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """A scratch folder beside `final`, renamed to `final` when the block succeeds and removed when
    it fails (`dlmoe._fs.staged_folder`): an interrupted import or export never leaves a
    half-written folder. `final` must not exist or be an empty folder."""
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise CheckpointError(f"{str(final)!r} exists and is not an empty folder; choose a new one")
    with _fs.staged_folder(final) as scratch:
        yield scratch


def write_shards(folder: Path, tensors: Iterator[tuple[str, Tensor]], max_shard_bytes: int) -> list[str]:
    """Write (name, tensor) pairs in order into shards of at most `max_shard_bytes` (a tensor larger
    than that gets a shard of its own) and the index; returns the shard file names."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    count = len(shards)
    names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    weight_map, total = {}, 0
    for file, shard in zip(names, shards, strict=True):
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _fs.atomic_write_text(folder / INDEX_FILE, json.dumps(index, indent=2) + "\n")
    return names
