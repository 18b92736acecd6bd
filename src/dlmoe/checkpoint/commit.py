"""The commit protocol of a checkpoint: scratch folder → files fsync-ed → meta.json → rename.

Layout, one directory per saved step (the files depend on the layout; `meta.json` lists them):

    <run_dir>/checkpoints/step_00001000/
        model.safetensors | dcp/   the weights (one process | sharded, `dlmoe.checkpoint.dcp_layout`)
        state.pt                   optimizer / scheduler / RNG / data state (`dlmoe.checkpoint.state`)
        meta.json                  layout, step, time, size and sha256 of every file; written LAST

Everything is written into `checkpoints/.tmp-step_<8-digit step>-<pid>`, every file and the folder
are fsync-ed, and only then is the folder renamed to its final name (`dlmoe._fs.replace_folder`):
a crash or a full disk leaves either a complete checkpoint or a `.tmp-*` folder that is never
mistaken for one and is removed by the next save. meta.json is the commit record: a step folder
without it, or whose files do not match its sizes and hashes, is invalid; `latest_checkpoint`
skips invalid ones and the loaders refuse them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from dlmoe._fs import atomic_write_json, pid_alive, remove_stale_scratch, replace_folder

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


# ---------------------------------------------------------------------------------------------------
# Writing


def begin_checkpoint(run_dir: str | Path, step: int, *, tag: int | None = None) -> tuple[Path, Path]:
    """Create the scratch directory `checkpoints/.tmp-step_<step>-<tag>` (tag: this pid); return it
    and the final `step_<step>` path. Stale scratch directories of dead processes are removed."""
    ckpt_root = Path(run_dir) / CHECKPOINTS
    ckpt_root.mkdir(parents=True, exist_ok=True)
    remove_stale_checkpoint_scratch(ckpt_root)
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
    atomic_write_json(tmp / META_FILE, meta)  # fsyncs the file and `tmp`
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


def remove_stale_checkpoint_scratch(ckpt_root: Path) -> None:
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
        if path == newest or (num_kept < keep_last and checkpoint_problem(path, hashes=False) is None):
            num_kept += 1
            continue
        logger.info("pruning checkpoint %s", path)
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Finding and verifying


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest valid `<run_dir>/checkpoints/step_*` (meta.json present, sizes and sha256 match), or None.

    Invalid ones are skipped with a warning naming the problem. Hashing reads every file once.
    """
    ckpt_root = Path(run_dir) / CHECKPOINTS
    if not ckpt_root.is_dir():
        return None
    for path in reversed(_step_dirs(ckpt_root)):
        problem = checkpoint_problem(path, hashes=True)
        if problem is None:
            return path
        logger.warning("skipping invalid checkpoint %s: %s", path, problem)
    return None


def checkpoint_layout(path: str | Path) -> str:
    """ "safetensors" (written by one process) or "dcp" (sharded, written by a torchrun launch)."""
    return read_meta(Path(path)).get("layout", "safetensors")


def checkpoint_problem(path: Path, *, hashes: bool) -> str | None:
    """None if the checkpoint at `path` is intact, else a description of what is wrong."""
    try:
        meta = read_meta(path)
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


def read_meta(path: Path) -> dict:
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
    meta = read_meta(path)
    if name not in meta["files"]:
        raise ValueError(f"checkpoint {path}: meta.json lists no {name!r}")
    return read_verified(path, name, meta["files"][name])


def read_verified(path: Path, name: str, expected: dict) -> bytes:
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
