"""Process-level runtime settings: which device a command runs on, and CPU allocator tuning.

`resolve_device` is the one place "auto" / "cpu" / "cuda" becomes a device.

MoE layers allocate several large temporaries per forward (gathered rows, expert activations,
their gradients). glibc serves allocations above its mmap threshold (≤ 32 MiB) with fresh pages
and unmaps them on free, so every step pays page faults on tens of MiB: on a 2-core machine
this made a [32768, 512] bf16 `index_select` 7× slower (20 ms vs 3 ms). Raising the mmap and trim
thresholds keeps freed memory in the heap for reuse. It is process-wide and opt-in: the CLI,
the trainer and the benchmarks call it (for the baseline and dlmoe alike).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

from dlmoe._checks import check_choice
from dlmoe.vocab import DEVICE_NAMES


def resolve_device(name: str, option: str = "train.device") -> torch.device:
    """ "auto" = CUDA when available, else the CPU; "cuda" without a GPU is refused, naming `option`."""
    check_choice(option, name, DEVICE_NAMES)
    cuda = torch.cuda.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "cpu")
    if name == "cuda" and not cuda:
        raise ValueError(f"{option}='cuda' but no CUDA device is available (allowed: {', '.join(DEVICE_NAMES)})")
    return torch.device(name)


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def tune_cpu_malloc(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Keep large freed blocks in the glibc heap (no munmap / page-fault churn).

    Returns True when applied; False on non-glibc platforms or when DLMOE_NO_MALLOC_TUNING=1.
    """
    global _tuned
    if _tuned:
        return True
    mallopt = _mallopt()
    if mallopt is None:
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1 and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1
    _tuned = ok
    return ok


def release_large_blocks(threshold: int = 1 << 17) -> bool:
    """The opposite of `tune_cpu_malloc`, for the expert store: serve blocks above `threshold` bytes
    with their own pages and give them back on free. glibc's default threshold rises after the first
    large free (up to 32 MiB), after which evicted 1–2 MiB experts stay in the heap, fragmented: the
    process then held ≈ 0.5 GB beyond its expert budget (bench/offload.py, token routing). A fixed
    threshold keeps the RSS at what the cache holds. Skipped (False) when `tune_cpu_malloc` already ran
    in this process (training chose to keep blocks) or off glibc."""
    mallopt = None if _tuned else _mallopt()
    return mallopt is not None and mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1


def _mallopt():
    """glibc's mallopt, or None (not Linux, DLMOE_NO_MALLOC_TUNING=1, musl or another libc without it)."""
    if os.environ.get("DLMOE_NO_MALLOC_TUNING") == "1" or not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def prepare_benchmark(threads: int | None = None, malloc_tuning: bool = True) -> dict[str, object]:
    """Set torch threads and malloc tuning for a benchmark process; return the facts for its meta line."""
    import platform

    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    tuned = tune_cpu_malloc() if malloc_tuning else False
    return {
        "meta": True,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "malloc_tuned": tuned,
    }
