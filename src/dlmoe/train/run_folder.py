"""A run folder is owned by one trainer at a time, and a finished run is never overwritten by accident.

- `RunLock`: an exclusive `fcntl.flock` on `<run_dir>/.lock`, held for the whole run. The kernel
  releases it when the process exits in any way (kill -9 included), so a stale lock never blocks;
  the file holds who took it (pid, host, command, time), which a refused second process names.
- `holds_run` / `clear_run`: a folder that holds a run (config, metrics, checkpoints, model) is
  refused unless the caller resumes it or asks to overwrite it; overwriting removes only the
  entries a run writes, never other files the user keeps there.
- `check_resume_config`: on `--resume` every setting that differs from the saved run is either
  applied (`RESUMABLE_KEYS`; `train.steps` may grow, not shrink) or refused by name, before
  anything is written.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlmoe.config import RunConfig
from dlmoe.config_io import run_config_to_dict

if TYPE_CHECKING:
    from dlmoe.precision import Precision

LOCK_FILE = ".lock"
# what a run writes into its folder (run.json: resolved precision and the hardware it ran on)
RUN_ENTRIES = (
    "config.json", "run.json", "metrics.csv", "val_bins.json", "loss.png",
    "checkpoints", "model", "tokenizer", "tensorboard",
)  # fmt: skip
_RUN_MARKERS = ("config.json", "metrics.csv", "checkpoints", "model")

# settings a resumed run may change: where and how it runs, logging, and the optimisation from now on
RESUMABLE_KEYS = (
    "run_dir", "train.steps", "train.lr", "train.min_lr_ratio", "train.warmup_steps", "train.lr_schedule",
    "train.decay_fraction", "train.weight_decay", "train.beta1", "train.beta2", "train.grad_clip",
    "train.dtype", "train.threads", "train.device", "train.log_every", "train.eval_every",
    "train.eval_batches", "train.checkpoint_every", "train.keep_last", "data.cache_dir", "sample", "parallel",
)  # fmt: skip
# derived from the run's tokenizer when the run starts (not settings): never compared
DERIVED_KEYS = ("model.vocab_size", "model.mask_id", "model.eos_id", "model.pad_id")


class RunLock:
    """Exclusive ownership of a run folder for the life of this object (`release()` or process exit)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._file = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the whole run
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _describe_holder(handle.read())
            handle.close()
            raise ValueError(
                f"run folder {str(self.path.parent)!r} is in use by another dlmoe process ({holder}); wait for it "
                "to finish, stop it, or choose another run_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": " ".join(["dlmoe", *sys.argv[1:]])[:300],
            "since": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        handle.write(json.dumps(holder) + "\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, `{holder['command']}`, since {holder['since']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


def holds_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds (part of) a run: a config, metrics, checkpoints or a model."""
    return any((Path(run_dir) / name).exists() for name in _RUN_MARKERS)


def clear_run(run_dir: Path) -> list[str]:
    """Remove the entries a run writes (`RUN_ENTRIES`) from `run_dir`; other files stay. Returns
    the names removed."""
    removed = []
    for name in RUN_ENTRIES:
        path = Path(run_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def check_resume_config(saved: RunConfig, requested: RunConfig, *, checkpoint_step: int) -> None:
    """Refuse, by name, every setting `requested` changes that a resumed run cannot apply.

    `train.steps` may be raised (the LR schedule stretches to the new length) but not lowered."""
    differing = _differences(run_config_to_dict(saved), run_config_to_dict(requested))
    refused = [
        f"{key} (run: {old!r}, asked: {new!r})"
        for key, (old, new) in differing.items()
        if not _resumable(key) and key not in DERIVED_KEYS
    ]
    if refused:
        raise ValueError(
            f"--resume cannot change {'; '.join(refused)}: they change what was trained. Drop these overrides, or "
            "start a new run (another run_dir, or train.init_from to start from this run's weights)"
        )
    if requested.train.steps < saved.train.steps:
        raise ValueError(
            f"--resume cannot shrink train.steps from {saved.train.steps} to {requested.train.steps} (the LR "
            f"schedule was laid out for {saved.train.steps}); the run is at step {checkpoint_step}. Keep it or raise it"
        )


def _resumable(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE_KEYS)


def _differences(a: Any, b: Any, prefix: str = "") -> dict[str, tuple[Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: dict[str, tuple[Any, Any]] = {}
        for key in sorted(set(a) | set(b)):
            out |= _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return {} if a == b else {prefix[:-1]: (a, b)}


def changed_keys(saved: RunConfig, requested: RunConfig) -> list[str]:
    """Dotted keys whose values differ (derived ones excluded), for the resume log line."""
    diff = _differences(run_config_to_dict(saved), run_config_to_dict(requested))
    return [f"{k}: {old!r} -> {new!r}" for k, (old, new) in diff.items() if k not in DERIVED_KEYS]


def record_launch(
    run_dir: Path, resumed_from_step: int | None, device: object, precision: Precision, world_size: int
) -> None:
    """Append one launch (resolved precision, hardware, resume point) to `<run_dir>/run.json`."""
    import torch

    from dlmoe._fs import atomic_write_json
    from dlmoe.precision import hardware_info

    path = Path(run_dir) / "run.json"
    try:
        record = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        record = {}  # a damaged record is replaced, never trusted
    launch = {
        "time_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "resumed_from_step": resumed_from_step,
        "device": str(device),
        "precision": precision.as_dict(),
        "hardware": hardware_info().as_dict(),
        "world_size": world_size,
        "torch": torch.__version__,
    }
    record["launches"] = [*record.get("launches", []), launch]
    atomic_write_json(path, record)


def remove_if_only_lock(run_dir: Path) -> None:
    """Remove a run folder this process created when it holds nothing but the lock and scratch."""
    entries = [e for e in run_dir.iterdir() if e.name != LOCK_FILE] if run_dir.is_dir() else None
    if entries == []:
        (run_dir / LOCK_FILE).unlink(missing_ok=True)
        run_dir.rmdir()
