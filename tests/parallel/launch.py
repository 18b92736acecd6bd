"""Run a function on N local processes with the torchrun environment (gloo), bounded in time.

Not `mp.spawn`: a rank that dies must not take the others down with it (the dead-rank test
checks what the survivors report). Each rank's exception goes to `<out>/rank<r>.err`."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(target: Callable, rank: int, world_size: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
    )  # fmt: skip
    import torch

    torch.set_num_threads(1)
    import faulthandler

    faulthandler.dump_traceback_later(float(os.environ.get("DLMOE_TEST_DUMP_S", "1e9")), exit=False)
    try:
        target(Path(out), *args)
    except BaseException:
        Path(out, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(target: Callable, out: Path, *args, world_size: int = 2, timeout: float = 120.0) -> list[int | None]:
    """Exit codes of the ranks (None: killed at the timeout). `target(out, *args)` runs on each."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(target, rank, world_size, port, str(out), args)) for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    codes = []
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
            codes.append(None)
        else:
            codes.append(proc.exitcode)
    return codes


def errors(out: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(out.glob("rank*.err")))


def assert_all_ok(codes: list[int | None], out: Path) -> None:
    assert codes == [0] * len(codes), f"exit codes {codes}\n{errors(out)}"
