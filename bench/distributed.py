"""Benchmark distributed MoE training steps on CPU: expert parallelism (EP) vs replicated experts, EC vs TC.

Every case is a real `torchrun --standalone --nproc_per_node=2` launch (gloo on CPU, OMP_NUM_THREADS
threads per rank) of this same file in worker mode; world size 2 always:
  EP=1  data parallel only (DDP or FSDP2): every rank holds all experts, no all_to_all
  EP=2  the experts are sharded over the two ranks, dispatched rows travel by all_to_all
for router ∈ {expert_choice (pool sequence), token_choice (dropless top-k, aux loss 0: no balancing,
so the skew of a fresh router shows)}, same k (same active FLOPs). One step = mask noise → forward →
ELBO loss + aux → backward → sync_expert_gradients → global clip_grad_norm_ (1.0) → AdamW → zero_grad,
in fp32 or under bf16 autocast (fp32 master weights): `--dtype auto` (default) picks bf16 only where this CPU
runs it natively (AVX512-BF16 / AMX; an AVX2 CPU emulates it, ~70x slower); each row says which and why
(dtype_reason). Every rank builds the model from the same seed and takes its rows of the same synthetic
global batch (fixed generator), with real mask noise.

Prints a meta line, then one JSON object per case:
    case, router, expert_parallel, world_size, data_parallel, dtype, dtype_reason, device, tokens (global per step),
    steps, step_ms_mean, step_ms_std, step_ms_median, tokens_per_s, all_to_all_ms_per_step,
    all_to_all_fraction, all_to_all_calls_per_step, all_to_all_mb_per_step, rank_load_max_over_mean,
    rank_load_basis, expert_load_max_over_mean, realized_k, loss, param_mib_per_rank,
    expert_param_mib_per_rank (the largest rank's parameters, local shards only; AdamW adds 2×)
then summary objects ({"summary": true, "comparison": ...}):
    ep2_over_ep1       per router: tokens_per_s_ep2_over_ep1 (> 1: sharding the experts pays off)
    ec_over_tc_at_ep2  ec_over_tc_step_time_at_ep2 (= EC step time / TC step time, < 1: EC faster), with
                       both routers' rank_load_max_over_mean next to it, and the same ratio at EP=1:
                       EC's expert compute is cheaper in itself (equal counts → one bmm), so the part
                       imbalance adds at EP=2 is the change from the EP=1 ratio, not the ratio alone
Measured how:
  step time     per step, the slowest rank's wall time (all_reduce MAX; the ranks start each step
                after a barrier); mean/std/median over the timed steps; tokens_per_s = global
                tokens / step_ms_mean.
  all_to_all    wall time inside the row exchanges (`ParallelModel.comm_stats`, forward and backward),
                the slowest rank per step. gloo's all_to_all blocks until the peer arrives, so this
                includes waiting for the busier rank: with TC's imbalance it is where the less loaded
                rank idles. The small split-size exchange before each is not counted. 0 at EP=1.
  rank load     rows the experts of each EP rank receive per step = Σ over ranks of the dispatch
                counts of that rank's experts; max/mean over ranks, averaged over MoE layers and
                steps. At EP=1 no rank receives rows; the figure is computed as if EP=2 split the
                experts the same way (rank_load_basis says which). EC (pool sequence) is 1.0 by
                construction; TC's max/mean is how long the busier rank's experts run vs the mean.
  expert load   the same over experts: max/mean of the global dispatch counts per expert.
Each case is its own launch, so a noisy stretch is not shared between a case and its baseline
within a run: `--rounds N` repeats all cases N times, rotating the order, and pools the steps.

    python bench/distributed.py                        # dim 128, 2 layers, E=8, k=2, 8×128 tokens, 10 steps
    python bench/distributed.py --data-parallel fsdp --dtype bf16
    python bench/distributed.py --rounds 3 --out runs/bench-distributed.jsonl
    python bench/distributed.py --quick                # tiny model, 3 steps (smoke run)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from distributed_worker import EXPERT_PARALLEL, QUICK, ROUTERS, SHAPES, WORLD_SIZE, model_config, worker
from dlmoe.precision import PRECISIONS, hardware_info, resolve_precision

# ----------------------------------------------------------------------------- launcher


def launch(router: str, ep: int, args: argparse.Namespace) -> dict:
    """One torchrun launch of the worker; returns rank 0's result line."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}",
        str(Path(__file__).resolve()), "--worker", "--router", router, "--ep", str(ep),
        "--data-parallel", args.data_parallel, "--dtype", args.dtype, "--threads", str(args.threads),
        "--warmup", str(args.warmup), "--steps", str(args.steps), "--seed", str(args.seed),
        "--backend", args.backend, "--collective-timeout", str(args.collective_timeout),
        *[f"--{name.replace('_', '-')}={getattr(args, name)}" for name in SHAPES],
        *(["--no-malloc-tuning"] if args.no_malloc_tuning else []),
    ]  # fmt: skip
    env = os.environ | {
        "OMP_NUM_THREADS": str(args.threads),
        "MKL_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    }
    # own process group: on a timeout torchrun and both ranks are ended together
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=args.case_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise SystemExit(f"case {router}/ep{ep}: no result within --case-timeout={args.case_timeout} s") from None
    results = [row for row in map(_json_or_none, stdout.splitlines()) if row and row.get("worker_result")]
    if proc.returncode != 0 or len(results) != 1:
        tail = "\n".join((stdout + "\n" + stderr).strip().splitlines()[-40:])
        raise SystemExit(f"case {router}/ep{ep}: torchrun exited with {proc.returncode}\n{tail}")
    return results[0]


def _json_or_none(line: str) -> dict | None:
    if not line.startswith("{"):
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


def case_row(router: str, ep: int, results: list[dict], args: argparse.Namespace) -> dict:
    """Pool the timed steps of a case's launches (one per round) into its JSON object."""
    step_ms = [t for r in results for t in r["step_ms"]]
    a2a_ms = [t for r in results for t in r["all_to_all_ms"]]
    mean_ms = statistics.fmean(step_ms)
    a2a = statistics.fmean(a2a_ms)
    tokens = args.batch * args.seq_len

    def pooled(key: str, ndigits: int = 3) -> float:
        values = [x for r in results for x in (r[key] if isinstance(r[key], list) else [r[key]])]
        return round(statistics.fmean(values), ndigits)

    return {
        "case": f"{router}/ep{ep}",
        "router": ROUTERS[router],
        "expert_parallel": ep,
        "world_size": WORLD_SIZE,
        "data_parallel": args.data_parallel,
        "dtype": args.dtype,
        "dtype_reason": args.dtype_reason,
        "device": f"cpu ({args.threads} threads per rank)",
        "tokens": tokens,
        "steps": len(step_ms),
        "step_ms_mean": round(mean_ms, 3),
        "step_ms_std": round(statistics.pstdev(step_ms), 3),
        "step_ms_median": round(statistics.median(step_ms), 3),
        "tokens_per_s": round(tokens / mean_ms * 1e3, 1),
        "all_to_all_ms_per_step": round(a2a, 3),
        "all_to_all_fraction": round(a2a / mean_ms, 4),
        "all_to_all_calls_per_step": pooled("all_to_all_calls_per_step", 1),
        "all_to_all_mb_per_step": pooled("all_to_all_mb_per_step"),
        "rank_load_max_over_mean": pooled("rank_load_max_over_mean", 4),
        "rank_load_basis": "ep_ranks" if ep > 1 else f"as_if_ep{WORLD_SIZE}",
        "expert_load_max_over_mean": pooled("expert_load_max_over_mean", 4),
        "realized_k": pooled("realized_k", 4),
        "loss": pooled("loss", 4),
        "param_mib_per_rank": pooled("param_mib_per_rank", 4),
        "expert_param_mib_per_rank": pooled("expert_param_mib_per_rank", 4),
    }


def summaries(rows: dict[tuple[str, int], dict]) -> list[dict]:
    out = []
    for router in ROUTERS:
        ep1, ep2 = rows.get((router, 1)), rows.get((router, WORLD_SIZE))
        if ep1 and ep2:
            out.append(
                {
                    "summary": True,
                    "comparison": "ep2_over_ep1",
                    "router": ROUTERS[router],
                    "tokens_per_s_ep2_over_ep1": round(ep2["tokens_per_s"] / ep1["tokens_per_s"], 3),
                    "ep1_tokens_per_s": ep1["tokens_per_s"],
                    "ep2_tokens_per_s": ep2["tokens_per_s"],
                }
            )
    ec, tc = rows.get(("ec", WORLD_SIZE)), rows.get(("tc", WORLD_SIZE))
    if ec and tc:
        ec1, tc1 = rows.get(("ec", 1)), rows.get(("tc", 1))
        out.append(
            {
                "summary": True,
                "comparison": "ec_over_tc_at_ep2",
                "ec_over_tc_step_time_at_ep2": round(ec["step_ms_mean"] / tc["step_ms_mean"], 3),
                "ec_rank_load_max_over_mean": ec["rank_load_max_over_mean"],
                "tc_rank_load_max_over_mean": tc["rank_load_max_over_mean"],
                "ec_all_to_all_ms_per_step": ec["all_to_all_ms_per_step"],
                "tc_all_to_all_ms_per_step": tc["all_to_all_ms_per_step"],
                "ec_over_tc_step_time_at_ep1": (
                    round(ec1["step_ms_mean"] / tc1["step_ms_mean"], 3) if ec1 and tc1 else None
                ),
            }
        )
    return out


def main_launcher(args: argparse.Namespace) -> None:
    out_file = None
    if args.out is not None:
        out_path = Path(args.out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_file = out_path.open("w" if args.overwrite else "x")

    def emit(obj: dict) -> None:
        line = json.dumps(obj)
        print(line, flush=True)
        if out_file is not None:
            out_file.write(line + "\n")
            out_file.flush()

    cases = [(router, ep) for router in args.routers for ep in args.expert_parallel]
    emit(
        {
            "meta": True,
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads_per_rank": args.threads,
            "world_size": WORLD_SIZE,
            "launcher": f"torch.distributed.run --standalone --nproc_per_node={WORLD_SIZE}",
            "process_group": "gloo",
            "data_parallel": args.data_parallel,
            "dtype": args.dtype,
            "dtype_reason": args.dtype_reason,
            "hardware": hardware_info().as_dict(),
            "warmup": args.warmup,
            "steps": args.steps,
            "rounds": args.rounds,
            "shapes": {k: getattr(args, k) for k in SHAPES},
            "cases": [f"{r}/ep{ep}" for r, ep in cases],
        }
    )
    t0 = time.perf_counter()
    results: dict[tuple[str, int], list[dict]] = {case: [] for case in cases}
    try:
        for r in range(args.rounds):
            for case in cases[r % len(cases) :] + cases[: r % len(cases)]:
                results[case].append(launch(*case, args))
        rows = {case: case_row(*case, res, args) for case, res in results.items()}
        for row in rows.values():
            emit(row)
        for summary in summaries(rows):
            emit(summary | {"wall_s": round(time.perf_counter() - t0, 1)})
    finally:
        if out_file is not None:
            out_file.close()


# ----------------------------------------------------------------------------- arguments


def int_at_least(low: int):
    """An argparse type: an integer >= `low`, with a message that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=positive_int, default=2048)
    p.add_argument("--dim", type=positive_int, default=128)
    p.add_argument("--layers", type=positive_int, default=2)
    p.add_argument("--heads", type=positive_int, default=4)
    p.add_argument(
        "--experts", type=positive_int, default=8, help=f"routed experts per layer (divisible by {WORLD_SIZE})"
    )
    p.add_argument("--k", type=positive_int, default=2, help="experts per token (TC top-k, EC's static k)")
    p.add_argument("--expert-hidden", type=positive_int, default=256, help="per-expert FFN width")
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--batch", type=positive_int, default=8, help=f"global batch (rows; divisible by {WORLD_SIZE})")
    p.add_argument("--backend", default="auto", choices=["auto", "loop", "bmm", "grouped_mm"], help="expert backend")
    p.add_argument("--data-parallel", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument(
        "--dtype", default="auto", choices=PRECISIONS,
        help="bf16: autocast, fp32 master weights; auto (default): bf16 where this CPU runs it natively, else fp32",
    )  # fmt: skip
    p.add_argument("--routers", nargs="+", default=list(ROUTERS), choices=list(ROUTERS))
    p.add_argument("--expert-parallel", nargs="+", type=int, default=list(EXPERT_PARALLEL), choices=EXPERT_PARALLEL)
    p.add_argument("--warmup", type=non_negative_int, default=3)
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps per launch")
    p.add_argument("--rounds", type=positive_int, default=1, help="launches per case (order rotated; steps pooled)")
    p.add_argument("--threads", type=positive_int, default=1, help="torch / OpenMP threads per rank")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--case-timeout", type=positive_float, default=900.0, help="seconds per torchrun launch")
    p.add_argument("--collective-timeout", type=positive_float, default=300.0, help="process group timeout (s)")
    p.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc thresholds alone")
    p.add_argument("--out", default=None, help="also write the JSON lines to this file")
    p.add_argument("--overwrite", action="store_true", help="let --out replace an existing file")
    p.add_argument("--quick", action="store_true", help="tiny model, 1 warmup + 3 timed steps (smoke run)")
    # worker mode (set by the launcher; not for direct use)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--router", choices=list(ROUTERS), help=argparse.SUPPRESS)
    p.add_argument("--ep", type=int, choices=EXPERT_PARALLEL, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    args.routers = list(dict.fromkeys(args.routers))
    args.expert_parallel = list(dict.fromkeys(args.expert_parallel))
    precision = resolve_precision(args.dtype, "cpu")  # the launcher passes the resolved name to the workers
    args.dtype, args.dtype_reason = precision.name, precision.reason
    if args.worker:
        if args.router is None or args.ep is None:
            p.error("--worker needs --router and --ep")
        return args
    if args.batch % WORLD_SIZE:
        p.error(f"--batch={args.batch} must be divisible by the world size {WORLD_SIZE} (each rank takes its rows)")
    if args.experts % WORLD_SIZE:
        p.error(f"--experts={args.experts} must be divisible by {WORLD_SIZE} (EP=2 shards them over 2 ranks)")
    for router in args.routers:
        try:
            model_config(router, args)
        except ValueError as error:
            p.error(f"the model does not build: {error}")
    if args.out is not None and Path(args.out).exists() and not args.overwrite:
        p.error(f"--out {args.out} exists; pass --overwrite to replace it")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
    else:
        main_launcher(args)


if __name__ == "__main__":
    sys.exit(main())
