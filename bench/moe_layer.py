"""Benchmark the MoE layer against a dense FFN of equal active FLOPs and transformers' OLMoE block.

Prints one JSON object per case:
    case, router, backend, dtype, dtype_reason, pass, tokens, ms, ms_std, dense_ms, efficiency (= dense_ms / ms),
    transformers_ms, speedup_vs_transformers (= transformers_ms / ms), same_routing_as_transformers
All three modules run in the same process, interleaved round-robin, median over repeats.
The transformers block is OLMoE's (softmax top-k, no renormalisation, eager expert loop) on the
same weights; only the TC-dropless cases route identically to it (`same_routing_as_transformers`).

`dtype_reason` says why a row ran in its dtype. By default the rows run in the dtype `auto` picks for
this CPU: bf16 with AVX512-BF16 / AMX, fp32 otherwise (an AVX2 CPU emulates bf16 matmuls, ~70x slower);
bf16 rows on such a CPU only when asked for (`--dtypes bfloat16 float32`).

    python bench/moe_layer.py                 # the issue's shapes: E=64, k=8, D=512, F=256, 8×512 tokens
    python bench/moe_layer.py --quick         # tiny shapes (smoke run)
    python bench/moe_layer.py --dtypes bfloat16 float32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from dlmoe.config import MoEConfig, RouterConfig
from dlmoe.moe import MoELayer, SwiGLU
from dlmoe.precision import Precision, hardware_info, resolve_precision
from dlmoe.runtime import prepare_benchmark

DTYPE_CHOICES = {"auto": "auto", "bfloat16": "bf16", "float32": "fp32"}  # --dtypes → dlmoe.precision names
ROUTER_CASES: dict[str, tuple[dict, str]] = {
    # name: (RouterConfig overrides, expert backend)
    "ec": ({"kind": "expert_choice"}, "auto"),
    "tc_dropless": ({"kind": "token_choice", "renormalize": False}, "auto"),
    "tc_cf1.25": ({"kind": "token_choice", "renormalize": False, "capacity_factor": 1.25}, "auto"),
    "tc_dropless_loop": ({"kind": "token_choice", "renormalize": False}, "loop"),
}


def build_olmoe_block(layer: MoELayer, dim: int, hidden: int, num_experts: int, k: int) -> torch.nn.Module | None:
    """transformers' OlmoeSparseMoeBlock holding the same weights as `layer` (None if unavailable)."""
    try:
        from transformers import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    except ImportError:
        return None
    cfg = OlmoeConfig(
        hidden_size=dim, intermediate_size=hidden, num_experts=num_experts, num_experts_per_tok=k, norm_topk_prob=False
    )
    block = OlmoeSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(layer.experts.gate_up_proj)
        block.experts.down_proj.copy_(layer.experts.down_proj)
    return block


def timed_round_robin(fns: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Run each fn `warmup` times, then `repeats` rounds of one call each; times in ms."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def make_step(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, backward: bool) -> Callable[[], None]:
    def call() -> torch.Tensor:
        out = module(x)
        return out[0] if isinstance(out, tuple) else out

    if not backward:

        def fwd() -> None:
            with torch.no_grad():
                call()

        return fwd

    def fwd_bwd() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        call().backward(grad)

    return fwd_bwd


def run_case(name: str, precision: Precision, backward: bool, args: argparse.Namespace) -> dict:
    dtype = precision.dtype
    overrides, backend = ROUTER_CASES[name]
    torch.manual_seed(0)
    router = RouterConfig(num_experts=args.experts, num_experts_per_tok=args.k, **overrides)
    layer = MoELayer(MoEConfig(router=router, expert_hidden=args.hidden, backend=backend), args.dim)
    dense = SwiGLU(args.dim, args.k * args.hidden)  # same active FLOPs: width k·F
    olmoe = build_olmoe_block(layer, args.dim, args.hidden, args.experts, args.k)
    modules = {"ours": layer, "dense": dense} | ({"transformers": olmoe} if olmoe is not None else {})
    for m in modules.values():
        m.to(dtype).train(backward)
    x = torch.randn(args.batch, args.length, args.dim, dtype=dtype, requires_grad=backward)
    grad = torch.randn_like(x)
    fns = {n: make_step(m, x, grad, backward) for n, m in modules.items()}
    times = timed_round_robin(fns, args.repeats, args.warmup)
    med = {n: statistics.median(t) for n, t in times.items()}
    tr_ms = med.get("transformers")
    return {
        "case": f"{name}/{str(dtype).removeprefix('torch.')}/{'fwd+bwd' if backward else 'fwd'}",
        "router": name,
        "backend": layer.experts.resolve_backend(router.kind == "expert_choice"),
        "dtype": str(dtype).removeprefix("torch."),
        "dtype_reason": precision.reason,
        "pass": "fwd+bwd" if backward else "fwd",
        "tokens": args.batch * args.length,
        "ms": round(med["ours"], 3),
        "ms_std": round(statistics.pstdev(times["ours"]), 3),
        "dense_ms": round(med["dense"], 3),
        "efficiency": round(med["dense"] / med["ours"], 3),
        "transformers_ms": None if tr_ms is None else round(tr_ms, 3),
        "speedup_vs_transformers": None if tr_ms is None else round(tr_ms / med["ours"], 3),
        "same_routing_as_transformers": name.startswith("tc_dropless"),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--hidden", type=int, default=256, help="per-expert FFN width")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--routers", nargs="+", default=list(ROUTER_CASES), choices=list(ROUTER_CASES))
    p.add_argument(
        "--dtypes", nargs="+", default=["auto"], choices=list(DTYPE_CHOICES),
        help="auto (default): bf16 where this CPU runs it natively, else fp32",
    )  # fmt: skip
    p.add_argument("--passes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc thresholds alone")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats (smoke run)")
    args = p.parse_args(argv)
    resolved = [resolve_precision(DTYPE_CHOICES[name], "cpu") for name in args.dtypes]
    args.precisions = list({pr.name: pr for pr in resolved}.values())  # one run per dtype
    if args.quick:
        args.experts, args.k, args.dim, args.hidden, args.batch, args.length = 8, 2, 32, 16, 2, 16
        args.repeats, args.warmup = 2, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    meta = prepare_benchmark(args.threads, malloc_tuning=not args.no_malloc_tuning)  # for every model timed
    print(
        json.dumps(
            meta
            | {
                "shapes": {k: getattr(args, k) for k in ("experts", "k", "dim", "hidden", "batch", "length")},
                "hardware": hardware_info().as_dict(),
            }
        ),
        flush=True,
    )
    for precision in args.precisions:
        for pass_name in args.passes:
            for name in args.routers:
                row = run_case(name, precision, pass_name == "fwd+bwd", args)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
