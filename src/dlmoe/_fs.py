"""Atomic, durable writes: the one path every file and folder dlmoe writes goes through.

A file is written to a temporary name in its own folder, flushed and fsync-ed, then renamed over
its final name (rename within one filesystem is atomic on POSIX), and the folder is fsync-ed so
the rename itself survives a crash. A folder (a model, a tokenizer) is built as a scratch folder
beside its final name and renamed into place when complete. A kill at any instant therefore
leaves either the previous version or the new one, never a truncated file; what it leaves is a
scratch entry (`.<name>.<pid>-….tmp`, `.<name>.partial-<pid>`) that `remove_stale_scratch`
deletes once its process is gone.

`DLMOE_KILL_AT=<name>` (tests only) SIGKILLs the process just before `<name>` would be renamed
into place, after its content was written: the worst instant for a non-atomic writer.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

KILL_AT_ENV = "DLMOE_KILL_AT"
_SCRATCH = re.compile(r"^\..+\.(?:(\d+)-[0-9a-f]{8}\.tmp|partial-(\d+)|old-(\d+))$")


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory so that renames and new entries in it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _kill_point(name: str) -> None:
    """Fault injection for the kill tests: die here (SIGKILL, no clean-up) when asked by name."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` into a temporary file beside `path`, make it durable, then rename it over `path`.

    On any failure the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        fsync_path(tmp)
        _kill_point(path.name)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """JSON (strict: NaN / inf are refused rather than written as invalid JSON) written atomically."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, allow_nan=False) + "\n"
    atomic_write_text(path, text)


@contextmanager
def staged_folder(final: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """A scratch folder beside `final`; when the block succeeds it is made durable and renamed to
    `final`, when it fails it is removed. `replace=False`: `final` must not exist or be empty.
    `replace=True`: an existing `final` is swapped out (renamed aside, then deleted) only once the
    new folder is complete."""
    final = Path(final)
    if not replace and final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise FileExistsError(f"{str(final)!r} exists and is not an empty folder; choose a new one")
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch
        for entry in scratch.rglob("*"):
            if entry.is_file():
                fsync_path(entry)
        fsync_path(scratch)
        _kill_point(final.name)
        replace_folder(scratch, final)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def replace_folder(new: Path, final: Path) -> None:
    """Rename the complete folder `new` to `final`. An existing `final` is renamed aside first and
    deleted last (put back if the second rename fails), so `final` is never missing a version."""
    if final.exists() and not (final.is_dir() and not any(final.iterdir())):
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        try:
            os.rename(new, final)
        except BaseException:
            os.rename(old, final)
            raise
        fsync_path(final.parent)
        shutil.rmtree(old, ignore_errors=True)
        return
    if final.exists():
        final.rmdir()
    os.rename(new, final)
    fsync_path(final.parent)


def remove_stale_scratch(folder: Path) -> list[Path]:
    """Delete the scratch entries in `folder` left by processes that no longer exist (or by this
    one); returns what was removed. A live process's scratch is never touched."""
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _SCRATCH.match(entry.name)
        if match is None:
            continue
        pid = int(next(g for g in match.groups() if g is not None))
        if pid != os.getpid() and pid_alive(pid):
            continue
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OverflowError:
        return False
    return True
