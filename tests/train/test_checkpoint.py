"""Checkpoints: exact round trips, RNG reproduction, pruning, integrity checks and atomic failure.

Corruption is simulated by editing files of a saved checkpoint (truncate, flip a byte, delete);
a full disk by making safetensors / torch.save raise ENOSPC halfway through writing.
"""

from __future__ import annotations

import collections
import errno
import hashlib
import io
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from dlmoe.checkpoint import (
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)

VOCAB, DIM = 11, 8


class TiedLM(nn.Module):
    """Embedding and output head share one weight, plus a buffer: the keys safetensors trips over."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.mix = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("scale", torch.linspace(0.5, 1.5, DIM))

    def forward(self, ids_BL: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids_BL))) * self.scale)


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None) -> None:
    ids_BL = torch.randint(0, VOCAB, (2, 5))
    loss = model(ids_BL).logsumexp(-1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()


def _make_run(seed: int = 0):
    torch.manual_seed(seed)
    model = TiedLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def _state(optimizer, scheduler, **extra) -> dict:
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng_state(),
        "data": {"epoch": 1, "offset": 7, "order": torch.arange(5)},
        **extra,
    }


def _assert_same_params(left: nn.Module, right: nn.Module) -> None:
    left_sd, right_sd = left.state_dict(), right.state_dict()
    assert left_sd.keys() == right_sd.keys()
    for name in left_sd:
        assert torch.equal(left_sd[name], right_sd[name]), name


def _save_simple(run_dir: Path, step: int, model: nn.Module, **kwargs) -> Path:
    return save_checkpoint(run_dir, step, model, {"note": f"step {step}"}, **kwargs)


def _scratch_dirs(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_restores_model_optimizer_scheduler_exactly(tmp_path: Path) -> None:
    model, optimizer, scheduler = _make_run(seed=0)
    for _ in range(2):
        _train_step(model, optimizer, scheduler)
    path = save_checkpoint(tmp_path, 2, model, _state(optimizer, scheduler, extra={"best_loss": 1.25}))
    assert path == tmp_path / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in path.iterdir()) == sorted([META_FILE, MODEL_FILE, STATE_FILE])

    resumed, resumed_optimizer, resumed_scheduler = _make_run(seed=1)  # different init
    state = load_checkpoint(path, resumed)
    resumed_optimizer.load_state_dict(state["optimizer"])
    resumed_scheduler.load_state_dict(state["scheduler"])
    _assert_same_params(model, resumed)
    assert resumed.head.weight is resumed.embed.weight, "tie must survive loading"
    assert state["step"] == 2 and state["extra"] == {"best_loss": 1.25} and state["data"]["offset"] == 7
    assert torch.equal(state["data"]["order"], torch.arange(5))
    _assert_nested_equal(resumed_optimizer.state_dict(), optimizer.state_dict())
    assert resumed_scheduler.state_dict()["last_epoch"] == scheduler.state_dict()["last_epoch"] == 2

    # One more identical step on both: equal only if the AdamW moments and lr schedule came back exactly.
    torch.manual_seed(5)
    _train_step(model, optimizer, scheduler)
    torch.manual_seed(5)
    _train_step(resumed, resumed_optimizer, resumed_scheduler)
    _assert_same_params(model, resumed)


def _assert_nested_equal(left, right) -> None:
    assert type(left) is type(right) or {type(left), type(right)} <= {dict, collections.OrderedDict}
    if isinstance(left, torch.Tensor):
        assert left.dtype == right.dtype and torch.equal(left, right)
    elif isinstance(left, dict):
        assert left.keys() == right.keys()
        for key in left:
            _assert_nested_equal(left[key], right[key])
    elif isinstance(left, list | tuple):
        assert len(left) == len(right)
        for a, b in zip(left, right, strict=True):
            _assert_nested_equal(a, b)
    else:
        assert left == right


def test_tied_weights_are_stored_under_every_key(tmp_path: Path) -> None:
    model, _, _ = _make_run()
    path = _save_simple(tmp_path, 0, model)
    stored = safetensors.torch.load_file(str(path / MODEL_FILE))
    assert set(stored) == set(model.state_dict())  # both embed.weight and head.weight
    assert torch.equal(stored["embed.weight"], stored["head.weight"])


def test_rng_state_reproduces_random_numpy_and_torch(tmp_path: Path) -> None:
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    random.gauss(0.0, 1.0)

    model, _, _ = _make_run()
    path = save_checkpoint(tmp_path, 1, model, {"rng": capture_rng_state()})
    expected = (random.random(), random.gauss(0.0, 1.0), np.random.standard_normal(3), torch.rand(4))

    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(path, model)["rng"])
    got = (random.random(), random.gauss(0.0, 1.0), np.random.standard_normal(3), torch.rand(4))
    assert got[:2] == expected[:2]
    np.testing.assert_array_equal(got[2], expected[2])
    assert torch.equal(got[3], expected[3])


def test_restore_rng_state_rejects_an_incomplete_dict() -> None:
    with pytest.raises(ValueError, match=r"missing \['numpy', 'python'\]"):
        restore_rng_state({"torch": torch.get_rng_state()})


# --------------------------------------------------------------------------------------------------
# Pruning and re-saving


def test_keep_last_prunes_oldest(tmp_path: Path) -> None:
    model, _, _ = _make_run()
    for step in range(1, 6):
        _save_simple(tmp_path, step, model, keep_last=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000004", "step_00000005"]


def test_pruning_counts_only_valid_checkpoints_and_skips_later_steps(tmp_path: Path) -> None:
    model, _, _ = _make_run()
    for step in (1, 2, 3, 9):
        _save_simple(tmp_path, step, model, keep_last=10)
    _truncate(tmp_path / "checkpoints" / "step_00000003" / MODEL_FILE)
    _save_simple(tmp_path, 4, model, keep_last=2)  # e.g. a run rewound to step 3 and continuing
    # step 3 is invalid: removed and not counted, so step 2 survives; step 9 is later and left alone.
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000002", "step_00000004", "step_00000009"]


def test_resaving_a_step_replaces_it(tmp_path: Path) -> None:
    model, _, _ = _make_run(seed=0)
    save_checkpoint(tmp_path, 7, model, {"version": "first"})
    with torch.no_grad():
        model.mix.weight.add_(1.0)
    path = save_checkpoint(tmp_path, 7, model, {"version": "second"})
    assert latest_checkpoint(tmp_path) == path
    assert _scratch_dirs(tmp_path) == []
    fresh, _, _ = _make_run(seed=1)
    assert load_checkpoint(path, fresh)["version"] == "second"
    _assert_same_params(model, fresh)


def test_stale_scratch_dirs_are_removed_on_next_save(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    dead = root / ".tmp-step_00000003-999999999"  # above any pid_max: no such process
    ours = root / f".tmp-step_00000003-{os.getpid()}"
    old = root / ".old-step_00000002-999999999"
    live = root / ".tmp-step_00000003-1"  # pid 1 always exists: maybe another writer, keep it
    for directory in (dead, ours, old, live):
        directory.mkdir(parents=True)
        (directory / MODEL_FILE).write_bytes(b"partial")
    model, _, _ = _make_run()
    _save_simple(tmp_path, 4, model)
    assert _scratch_dirs(tmp_path) == [live.name]


# --------------------------------------------------------------------------------------------------
# Integrity


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _flip_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


DAMAGE = {
    "truncated_model": (lambda p: _truncate(p / MODEL_FILE), r"model\.safetensors has \d+ bytes.*truncated"),
    "corrupt_state": (lambda p: _flip_byte(p / STATE_FILE), r"state\.pt sha256 does not match.*corrupt"),
    "corrupt_model": (lambda p: _flip_byte(p / MODEL_FILE), r"model\.safetensors sha256 does not match"),
    "missing_meta": (lambda p: (p / META_FILE).unlink(), r"meta\.json is missing"),
    "missing_state": (lambda p: (p / STATE_FILE).unlink(), r"state\.pt is missing"),
    "garbled_meta": (lambda p: (p / META_FILE).write_text("{not json"), r"meta\.json is unreadable"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_damaged_checkpoint_is_skipped_and_refused(tmp_path: Path, damage: str) -> None:
    break_checkpoint, message = DAMAGE[damage]
    model, _, _ = _make_run(seed=0)
    good = _save_simple(tmp_path, 1, model)
    bad = _save_simple(tmp_path, 2, model)
    break_checkpoint(bad)

    assert latest_checkpoint(tmp_path) == good
    target, _, _ = _make_run(seed=1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=message) as caught:
        load_checkpoint(bad, target)
    assert str(bad) in str(caught.value)
    for name, value in target.state_dict().items():
        assert torch.equal(value, before[name]), f"{name} was modified by a failed load"


def test_latest_checkpoint_without_any(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints" / "step_00000001").mkdir(parents=True)  # never completed
    assert latest_checkpoint(tmp_path) is None


def test_load_into_mismatched_model_leaves_it_untouched(tmp_path: Path) -> None:
    model, _, _ = _make_run()
    path = _save_simple(tmp_path, 1, model)
    other = nn.Sequential(nn.Linear(DIM, DIM))
    before = other[0].weight.detach().clone()
    with pytest.raises(ValueError, match=r"does not match the model: missing keys \['0.bias', '0.weight'\]"):
        load_checkpoint(path, other)
    assert torch.equal(other[0].weight, before)


# --------------------------------------------------------------------------------------------------
# Failures while saving


def _enospc_after_partial_write(path_argument_index: int):
    def fail(*args, **kwargs):
        target = args[path_argument_index]
        if isinstance(target, str | os.PathLike):
            Path(target).write_bytes(b"half a file")
        else:
            target.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    return fail


@pytest.mark.parametrize("failing", ["safetensors", "torch_save"])
def test_disk_full_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str) -> None:
    model, _, _ = _make_run()
    previous = _save_simple(tmp_path, 1, model, keep_last=1)
    if failing == "safetensors":
        monkeypatch.setattr(safetensors.torch, "save_file", _enospc_after_partial_write(1))
    else:
        monkeypatch.setattr(torch, "save", _enospc_after_partial_write(1))

    disk_full = r"disk full while writing .*step_00000002 \(checkpoint step 2: No space left on device\); earlier"
    with pytest.raises(OSError, match=disk_full) as caught:
        _save_simple(tmp_path, 2, model, keep_last=1)
    assert caught.value.errno == errno.ENOSPC
    assert _scratch_dirs(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001"]
    assert latest_checkpoint(tmp_path) == previous
    load_checkpoint(previous, model)


def test_other_errors_while_saving_become_runtime_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise TypeError("boom")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    model, _, _ = _make_run()
    with pytest.raises(RuntimeError, match=r"saving checkpoint step 3 .* failed \(boom\)"):
        _save_simple(tmp_path, 3, model)
    assert _scratch_dirs(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# weights_only


class _Opaque:
    pass


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"extra": {"thing": _Opaque()}}, r"state\['extra'\]\['thing'\] is a .*_Opaque"),
        ({"losses": [1.0, np.float64(2.0)]}, r"state\['losses'\]\[1\] is a numpy.float64.*\.item\(\)"),
        ({"dd": collections.defaultdict(int)}, r"state\['dd'\] is a collections.defaultdict"),
        ({"rng": np.random.get_state()}, r"state\['rng'\]\[1\] is a numpy.ndarray"),
    ],
)
def test_state_that_weights_only_cannot_read_is_rejected_at_save(tmp_path: Path, value: dict, where: str) -> None:
    model, _, _ = _make_run()
    with pytest.raises(ValueError, match=where):
        save_checkpoint(tmp_path, 1, model, value)
    assert not (tmp_path / "checkpoints" / "step_00000001").exists()


ALLOWED = {
    "none": None,
    "bool": True,
    "int": 2**70,
    "float": float("inf"),
    "complex": 1 + 2j,
    "str": "text",
    "bytes": b"\x00\x01",
    "bytearray": bytearray(b"ab"),
    "dtype": torch.bfloat16,
    "device": torch.device("cpu"),
    "size": torch.Size([2, 3]),
    "ordered": collections.OrderedDict(a=1),
    "set": {1, 2},
    "tuple": (1, [2, {"three": 3}]),
    "tensor": torch.arange(6).view(2, 3)[:, 1:],
    "parameter": nn.Parameter(torch.ones(2)),
}


@pytest.mark.parametrize("name", ALLOWED, ids=list(ALLOWED))
def test_every_accepted_type_loads_with_weights_only(tmp_path: Path, name: str) -> None:
    model, _, _ = _make_run()
    path = save_checkpoint(tmp_path, 1, model, {"value": ALLOWED[name]})
    loaded = load_checkpoint(path, model)["value"]
    if isinstance(loaded, torch.Tensor):
        assert torch.equal(loaded, ALLOWED[name])
    else:
        assert loaded == ALLOWED[name] and type(loaded) is type(ALLOWED[name])


def test_pickled_object_in_state_file_is_refused_at_load(tmp_path: Path) -> None:
    """A state.pt that needs full unpickling (hand-made, hashes updated) must not be executed."""
    model, _, _ = _make_run()
    path = _save_simple(tmp_path, 1, model)
    buffer = io.BytesIO()
    torch.save({"step": 1, "thing": _Opaque()}, buffer)
    (path / STATE_FILE).write_bytes(buffer.getvalue())
    meta = json.loads((path / META_FILE).read_text())
    meta["files"][STATE_FILE] = {
        "size": len(buffer.getvalue()),
        "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
    }
    (path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"state\.pt cannot be loaded safely \(weights_only\)"):
        load_checkpoint(path, model)


def test_invalid_arguments(tmp_path: Path) -> None:
    model, _, _ = _make_run()
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        save_checkpoint(tmp_path, 1, model, {}, keep_last=0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        save_checkpoint(tmp_path, -1, model, {})
    with pytest.raises(ValueError, match=r"state\['step'\] = 5 disagrees with step = 6"):
        save_checkpoint(tmp_path, 6, model, {"step": 5})
    with pytest.raises(ValueError, match="state must be a dict"):
        save_checkpoint(tmp_path, 6, model, [1])
