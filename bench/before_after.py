"""Time a benchmark at two commits in one run: a change is judged by ratios measured side by side.

The base commit is exported (`git archive`) into a temporary folder; then the same bench script
runs alternately from the base tree and from the working tree, `--rounds` times each (a fresh
process per run, each importing its own `src/`), so both see the same machine load. Prints one
JSON object per case with the median of each side's per-round figure and their ratio:

    {"case", "metric", "base", "head", "head_over_base", "rounds", "base_rev", "head_rev", "bench"}

`head_over_base` < 1 means the working tree is faster (for time metrics such as `ms`).

    python bench/before_after.py --base fe0d6f5 --bench moe_layer.py --metric ms -- --quick
    python bench/before_after.py --base fe0d6f5 --bench train_step.py --metric ms --rounds 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def export_tree(rev: str, into: Path) -> str:
    """Unpack commit `rev` of this repository into `into`; return its full hash."""
    full = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"], capture_output=True, text=True
    )
    if full.returncode:
        raise SystemExit(f"--base {rev!r} is not a commit of {ROOT} ({full.stderr.strip()})")
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", full.stdout.strip()], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    return full.stdout.strip()


def run_bench(tree: Path, bench: str, args: list[str]) -> list[dict]:
    """One process: `tree/bench/<bench> args` importing `tree/src`; its JSON rows (non-JSON lines ignored)."""
    env = os.environ | {"PYTHONPATH": str(tree / "src"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(tree / "bench" / bench), *args], capture_output=True, text=True, env=env, cwd=tree
    )
    if done.returncode:
        raise SystemExit(f"{tree / 'bench' / bench} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    rows = []
    for line in done.stdout.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def case_key(row: dict, keys: list[str]) -> str | None:
    if not all(k in row for k in keys):
        return None
    return " ".join(str(row[k]) for k in keys)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the commit to compare against (e.g. a hash or HEAD~3)")
    p.add_argument("--bench", required=True, help="a script under bench/, e.g. moe_layer.py")
    p.add_argument("--metric", default="ms", help="the per-case figure to compare (default: ms)")
    p.add_argument("--case-keys", nargs="+", default=["case"], help="row fields that name a case (default: case)")
    p.add_argument("--rounds", type=int, default=3, help="runs per side, alternating (default: 3)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: arguments for the bench script")
    args = p.parse_args()
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1, got {args.rounds}")
    if not (ROOT / "bench" / args.bench).is_file():
        raise SystemExit(f"--bench {args.bench!r}: no such script under {ROOT / 'bench'}")
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    head_rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    status = ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"]
    dirty = bool(subprocess.run(status, capture_output=True).stdout)  # tracked files changed
    figures: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="dlmoe-base-") as tmp:
        base_rev = export_tree(args.base, Path(tmp))
        for round_index in range(args.rounds):
            order = [("base", Path(tmp)), ("head", ROOT)]
            for side, tree in order if round_index % 2 == 0 else order[::-1]:  # alternate who goes first
                for row in run_bench(tree, args.bench, bench_args):
                    key = case_key(row, args.case_keys)
                    if key is not None and isinstance(row.get(args.metric), int | float):
                        figures.setdefault(key, {"base": [], "head": []})[side].append(float(row[args.metric]))
    for key, sides in figures.items():
        if not sides["base"] or not sides["head"]:
            continue
        base, head = statistics.median(sides["base"]), statistics.median(sides["head"])
        print(
            json.dumps(
                {
                    "case": key,
                    "metric": args.metric,
                    "base": round(base, 4),
                    "head": round(head, 4),
                    "head_over_base": round(head / base, 4) if base else None,
                    "rounds": args.rounds,
                    "base_rev": base_rev[:12],
                    "head_rev": head_rev.strip()[:12] + ("+dirty" if dirty else ""),
                    "bench": args.bench,
                    "bench_args": bench_args,
                }
            )
        )


if __name__ == "__main__":
    main()
