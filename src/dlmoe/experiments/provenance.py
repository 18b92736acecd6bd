"""What ran, where and on what: the provenance record committed beside an experiment's raw data.

A reader of docs/results.md must be able to tell which code produced a number (git commit and
whether the tree had uncommitted changes), how it was invoked (the full command line), with which
settings (each run's resolved config.json is archived with its metrics), on which machine (torch,
dtype and why, CPU / GPU model, threads) and how busy that machine was (load average before and
after: timing figures from a loaded machine are flagged by the renderer).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BUSY_LOAD_PER_CORE = 0.5  # 1-minute load average per core above which a machine is "not idle"


def git_state(where: Path | None = None) -> dict[str, Any]:
    """{"commit", "dirty"} of the git checkout holding `where` (this package by default); None each
    when it is not a checkout or git is missing (an installed wheel). "dirty": tracked files other than
    docs/results.md and docs/results/ differ from the commit (a suite's earlier experiments rewrite those)."""
    where = where or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode:
            return {"commit": None, "dirty": None}
        status = subprocess.run(  # the results documents are experiments' output, not code: not "dirty"
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
             ":(top,exclude)docs/results.md", ":(top,exclude)docs/results"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> dict[str, Any]:
    """1 / 5 / 15-minute load averages, the core count and whether the machine counts as busy."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return {"1m": None, "5m": None, "15m": None, "cores": os.cpu_count(), "busy": None}
    cores = os.cpu_count() or 1
    return {"1m": one, "5m": five, "15m": fifteen, "cores": cores, "busy": one / cores > BUSY_LOAD_PER_CORE}


def start_record(device: str = "cpu", jobs: int = 1) -> dict[str, Any]:
    """The provenance known when an experiment starts (the load average before it; `jobs` training
    runs at once, each with `threads` threads — the experiment's own load)."""
    import torch

    from dlmoe.experiments.jobs import threads_per_job
    from dlmoe.precision import hardware_info, resolve_precision

    precision = resolve_precision("auto", device)
    gpu = torch.cuda.get_device_name(0) if device == "cuda" and torch.cuda.is_available() else None
    return {
        "git": git_state(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dtype": precision.name,
        "dtype_reason": precision.reason,
        "device": device,
        "cpu": cpu_model(),
        "gpu": gpu,
        "threads": torch.get_num_threads() if jobs == 1 else threads_per_job(jobs),
        "jobs": jobs,
        "hardware": hardware_info().as_dict(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_before": load_average(),
    }


def finish_record(record: dict[str, Any], started: float) -> dict[str, Any]:
    """`record` completed when the experiment ends: wall time and the load average after it. The
    1-minute average then still holds the experiment's own runs (≈ jobs × threads), so "busy" after
    is judged on the load beyond that."""
    after = load_average()
    own = record.get("jobs", 1) * record.get("threads", 1)
    if after["1m"] is not None:
        after["own"] = own
        after["busy"] = max(after["1m"] - own, 0.0) / after["cores"] > BUSY_LOAD_PER_CORE
    return record | {
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": round(time.perf_counter() - started, 1),
        "load_after": after,
    }


def machine_line(record: dict[str, Any]) -> str:
    """One sentence for the report: where it ran, how busy the machine was, which commit."""
    before, after = record.get("load_before") or {}, record.get("load_after") or {}
    busy = bool(before.get("busy")) or bool(after.get("busy"))
    git = record.get("git") or {}
    commit = (git.get("commit") or "unknown")[:10] + (" (uncommitted changes)" if git.get("dirty") else "")
    load = f"load average {_load(before)} before, {_load(after)} after on {before.get('cores', '?')} cores"
    if after.get("own") is not None:
        load += f" (≈ {after['own']} of it this experiment's own runs)"
    warning = " — **the machine was not idle: wall-clock figures are inflated and noisy**" if busy else ""
    jobs = record.get("jobs", 1)
    threads = f"{record.get('threads', '?')} threads"
    if jobs > 1:
        threads = f"{jobs} runs at once with {threads} each (wall-clock figures are per run on shared cores)"
    return (
        f"Ran on {record.get('cpu', '?')}{' + ' + record['gpu'] if record.get('gpu') else ''}, "
        f"{threads}, {record.get('dtype', '?')}, torch {record.get('torch', '?')}, "
        f"commit {commit}; {load}{warning}; {record.get('wall_s', '?')} s in all."
    )


def _load(load: dict[str, Any]) -> str:
    return "?" if load.get("1m") is None else f"{load['1m']:.2f}"
