"""A model folder's safetensors tensors located by byte range, read by `os.pread` — never mapped.

safetensors' own reader memory-maps a shard: every page of it that is touched stays resident in the
process (and counts in its RSS) until the shard is unmapped. An expert store reads one expert's rows
of a stacked [E, …] tensor at a time, many times over a generation, so it reads the byte range
itself: the safetensors header (8-byte little-endian length, then a JSON directory of dtype, shape
and data offsets) says where each tensor lies; a row is `prod(shape[1:])` elements at
`start + row · row_bytes`. Reads go through the page cache, which the kernel may drop, not through
the process's memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from dlmoe.model.convert.files import INDEX_FILE, SAFETENSORS_DTYPES, SINGLE_FILE

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


class OffloadError(ValueError):
    """A model folder the expert store cannot read: says which file and what is wrong with it."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie: file, dtype, shape and the absolute byte range [start, end)."""

    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one slice along the first dimension."""
        return math.prod(self.shape[1:]) * torch.empty((), dtype=self.dtype).element_size()


def tensor_directory(model_dir: Path) -> dict[str, StoredTensor]:
    """Every tensor of the folder's safetensors files (sharded with an index, or one file), each
    file's header checked against its size: a missing or truncated shard is reported here, by name."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise OffloadError(f"{index} is not a safetensors index (no 'weight_map' object): {error}") from error
    elif (model_dir / SINGLE_FILE).is_file():
        files = [SINGLE_FILE]
    else:
        raise OffloadError(f"{model_dir} holds neither {SINGLE_FILE} nor {INDEX_FILE}: no weights to read")
    directory: dict[str, StoredTensor] = {}
    for name in files:
        path = model_dir / name
        if not path.is_file():
            raise OffloadError(f"shard {path} is missing (the index names it): the model folder is incomplete")
        directory |= read_header(path)
    return directory


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file, with absolute byte ranges checked against its size."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise OffloadError(f"shard {path} is truncated ({size} bytes): not a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise OffloadError(f"shard {path} is truncated or not a safetensors file (header of {length} bytes)")
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            raise OffloadError(f"shard {path} has a damaged header: {error}") from error
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in SAFETENSORS_DTYPES:
            raise OffloadError(f"shard {path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, finish = (8 + length + offset for offset in info["data_offsets"])
        if finish > size:
            raise OffloadError(
                f"shard {path} is truncated: tensor {name!r} ends at byte {finish}, the file has {size} bytes"
            )
        out[name] = StoredTensor(path, SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]), begin, finish)
    return out


def read_tensor(tensor: StoredTensor) -> Tensor:
    """A whole tensor (dense weights: read once at load)."""
    return _pread(tensor, tensor.start, tensor.end - tensor.start).view(tensor.shape)


def read_row(tensor: StoredTensor, row: int) -> Tensor:
    """Slice `row` of the first dimension (one expert of a stacked [E, …] tensor), a fresh tensor."""
    if not 0 <= row < tensor.shape[0]:
        raise IndexError(f"row {row} out of range for a tensor of shape {tensor.shape}")
    nbytes = tensor.row_bytes
    return _pread(tensor, tensor.start + row * nbytes, nbytes).view(tensor.shape[1:])


def _pread(tensor: StoredTensor, offset: int, nbytes: int) -> Tensor:
    buffer = bytearray(nbytes)
    view = memoryview(buffer)
    fd = os.open(tensor.path, os.O_RDONLY)
    try:
        done = 0
        while done < nbytes:  # pread may return fewer bytes than asked
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise OffloadError(f"shard {tensor.path} ended early at byte {offset + done}: it was truncated")
            done += got
    finally:
        os.close(fd)
    return torch.frombuffer(buffer, dtype=tensor.dtype) if nbytes else torch.empty(0, dtype=tensor.dtype)
