"""A tampered checkpoint never runs code: state.pt payloads (os.system in __reduce__, a custom class,
`eval`, a truncated archive) and a DCP `.metadata` that would run code are refused in ONE line naming
the checkpoint, with meta.json's sizes and hashes rewritten so that the integrity check passes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint.metadata as dcp_metadata
from torch import nn

from dlmoe.checkpoint import META_FILE, STATE_FILE, latest_checkpoint, load_checkpoint, save_checkpoint
from dlmoe.checkpoint.dcp_layout import load_sharded_checkpoint, save_sharded_checkpoint

REFUSED = r"state\.pt cannot be loaded safely \(weights_only\)"


class RunsCode:
    """Unpickling it with full pickle creates `marker` through os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class Custom:
    def __init__(self) -> None:
        self.value = 1


def _torch_saved(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def payloads(marker: Path) -> dict[str, bytes]:
    """Bytes a tampered state.pt might hold, each refused by torch.load(weights_only=True) or earlier."""
    return {
        "pickle_reduce_os_system": pickle.dumps({"step": 1, "x": RunsCode(marker)}),
        "torch_save_reduce_os_system": _torch_saved({"step": 1, "x": RunsCode(marker)}),
        "torch_save_custom_class": _torch_saved({"step": 1, "x": Custom()}),
        "pickle_of_eval": pickle.dumps(eval),
        "truncated_zip": _torch_saved({"step": 1, "w": torch.ones(64)})[:300],
    }


PAYLOADS = list(payloads(Path("unused")))


def replace_file(checkpoint: Path, name: str, blob: bytes) -> None:
    """Write `blob` as `checkpoint/name` and record its size and sha256 in meta.json (as an attacker would)."""
    (checkpoint / name).write_bytes(blob)
    meta = json.loads((checkpoint / META_FILE).read_text())
    meta["files"][name] = {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
    (checkpoint / META_FILE).write_text(json.dumps(meta))


def _one_line_naming(error: pytest.ExceptionInfo, checkpoint: Path) -> str:
    message = str(error.value)
    assert "\n" not in message and str(checkpoint) in message
    return message


@pytest.mark.parametrize("payload", PAYLOADS)
def test_tampered_state_file_is_refused_and_never_run(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "marker"
    model = nn.Linear(3, 2)
    checkpoint = save_checkpoint(tmp_path / "run", 1, model, {"extra": 1})
    replace_file(checkpoint, STATE_FILE, payloads(marker)[payload])
    assert latest_checkpoint(tmp_path / "run") == checkpoint  # the integrity check passes: only loading can tell
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=REFUSED) as caught:
        load_checkpoint(checkpoint, model)
    message = _one_line_naming(caught, checkpoint)
    assert "weights_only=False" not in message  # never torch's advice to load it unsafely
    assert not marker.exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is untouched


def _sharded(tmp_path: Path) -> tuple[Path, nn.Module, torch.optim.Optimizer]:
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return (
        save_sharded_checkpoint(tmp_path / "run", 1, model, optimizer, {"extra": 1}, None, keep_last=1),
        model,
        optimizer,
    )


def test_a_genuine_sharded_checkpoint_still_loads(tmp_path: Path) -> None:
    checkpoint, model, _ = _sharded(tmp_path)
    other = nn.Linear(3, 2)
    state = load_sharded_checkpoint(checkpoint, other, torch.optim.AdamW(other.parameters()), None)
    assert state["step"] == 1 and torch.equal(other.weight, model.weight)


@pytest.mark.parametrize("payload", PAYLOADS)
def test_tampered_state_file_of_a_sharded_checkpoint_is_refused(tmp_path: Path, payload: str) -> None:
    marker = tmp_path / "marker"
    checkpoint, model, optimizer = _sharded(tmp_path)
    replace_file(checkpoint, STATE_FILE, payloads(marker)[payload])
    with pytest.raises(ValueError, match=REFUSED) as caught:
        load_sharded_checkpoint(checkpoint, model, optimizer, None)
    _one_line_naming(caught, checkpoint)
    assert not marker.exists()


def _metadata(checkpoint: Path) -> dcp_metadata.Metadata:
    return pickle.loads((checkpoint / "dcp" / ".metadata").read_bytes())  # written by this test: trusted


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path: Path) -> None:
    """DCP reads `.metadata` with plain pickle.load: it is checked with an allow-list unpickler first."""
    marker = tmp_path / "marker"
    checkpoint, model, optimizer = _sharded(tmp_path)
    replace_file(checkpoint, "dcp/.metadata", pickle.dumps(RunsCode(marker)))
    with pytest.raises(ValueError, match=r"dcp/\.metadata cannot be loaded safely: posix\.system") as caught:
        load_sharded_checkpoint(checkpoint, model, optimizer, None)
    _one_line_naming(caught, checkpoint)
    assert not marker.exists()


def test_dcp_metadata_asking_for_pickled_entries_or_outside_files_is_refused(tmp_path: Path) -> None:
    """BytesStorageMetadata entries are read by DCP with torch.load(weights_only=False): refused."""
    checkpoint, model, optimizer = _sharded(tmp_path)
    genuine = (checkpoint / "dcp" / ".metadata").read_bytes()
    metadata = _metadata(checkpoint)
    metadata.state_dict_metadata["model.weight"] = dcp_metadata.BytesStorageMetadata()
    replace_file(checkpoint, "dcp/.metadata", pickle.dumps(metadata))
    with pytest.raises(ValueError, match=r"entries \['model\.weight'\] are not tensors"):
        load_sharded_checkpoint(checkpoint, model, optimizer, None)

    replace_file(checkpoint, "dcp/.metadata", genuine)
    metadata = _metadata(checkpoint)
    for info in metadata.storage_data.values():
        info.relative_path = "../../../../etc/passwd"
    replace_file(checkpoint, "dcp/.metadata", pickle.dumps(metadata))
    with pytest.raises(ValueError, match=r"names the data file '\.\./\.\./\.\./\.\./etc/passwd'"):
        load_sharded_checkpoint(checkpoint, model, optimizer, None)
