"""Benchmark full training steps of the demo-size MoE diffusion LM against a dense model of equal active FFN width.

One step = noise → forward → ELBO loss + router aux loss → backward → grad-norm clip (1.0) → AdamW step → zero_grad,
under bf16 autocast (fp32 master weights) or in plain fp32: `--dtype auto` (default) picks bf16 only where
this CPU runs it natively (AVX512-BF16 / AMX; an AVX2 CPU emulates it, ~70x slower). Prints one JSON object per case:
    case, router, dtype, dtype_reason, ms, ms_std, baseline_ms, ratio (= baseline_ms / ms), tokens_per_s,
    baseline_tokens_per_s, active_params, total_params, expected_k,
    realized_k (dispatched slots per token: < k when capacity drops),
    load_max_over_mean (busiest expert's rows / mean, averaged over layers and timed steps), backend, loss
then a summary line {"summary": true, "ec_over_tc_dropless", "ec_over_tc_cf1.25", ...} (step-time ratios).
A meta line comes first. Every model is built from the same seed, sees the same batch and the same noise
draws, and all cases run in one process, interleaved round-robin (rotating which case starts a round);
figures are medians over repeats.

Cases:
  ec                 expert choice, static k
  ec_linear_reverse  expert choice, k_b from the linear_reverse capacity schedule; k_max solved so that
                     E[active experts per token] matches k (FLOPs-matched; `expected_k` says how closely)
  tc_cf1.25          token choice, Switch aux loss 0.01, capacity factor 1.25
  tc_dropless        token choice, Switch aux loss 0.01, no capacity
  dense              the baseline: every FFN a SwiGLU of width k·expert_hidden (same active FFN params)
`ratio` ≥ 0.8 means the MoE step is within 25% of the dense step. Freshly initialised token-choice routing is
skewed (see load_max_over_mean), so tc_cf1.25 drops slots (realized_k < k) and does less expert work than the
other cases; EC is balanced by construction.

    python bench/train_step.py                # demo size: V=4096, D=256, 4 layers, 16×256 tokens, E=16, k=2
    python bench/train_step.py --quick        # tiny shapes (smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from dlmoe.config import ModelConfig, MoEConfig, RouterConfig
from dlmoe.diffusion import add_mask_noise, masked_diffusion_loss
from dlmoe.model.transformer import DiffusionTransformer
from dlmoe.moe import MoELayer
from dlmoe.precision import PRECISIONS, hardware_info, resolve_precision
from dlmoe.routing.schedules import expected_k, solve_k_max
from dlmoe.runtime import prepare_benchmark

BASELINE = "dense"
SCHEDULE = "linear_reverse"
MOE_CASES = ("ec", f"ec_{SCHEDULE}", "tc_cf1.25", "tc_dropless")
CASES = (*MOE_CASES, BASELINE)
SHAPES = ("vocab", "dim", "layers", "heads", "seq_len", "batch", "experts", "k", "expert_hidden")


def router_overrides(name: str, args: argparse.Namespace) -> dict | None:
    """RouterConfig fields of a case (None: the dense baseline)."""
    return {
        "ec": {"kind": "expert_choice"},
        f"ec_{SCHEDULE}": {
            "kind": "expert_choice",
            "capacity_schedule": SCHEDULE,
            "k_min": args.k_min,
            "k_max": args.k_max,
        },
        "tc_cf1.25": {"kind": "token_choice", "aux_loss_coef": args.aux_loss_coef, "capacity_factor": 1.25},
        "tc_dropless": {"kind": "token_choice", "aux_loss_coef": args.aux_loss_coef},
        BASELINE: None,
    }[name]


def build_model(name: str, args: argparse.Namespace) -> DiffusionTransformer:
    overrides = router_overrides(name, args)
    moe = None
    if overrides is not None:
        router = RouterConfig(num_experts=args.experts, num_experts_per_tok=args.k, **overrides)
        moe = MoEConfig(router=router, expert_hidden=args.expert_hidden, backend=args.backend)
    config = ModelConfig(
        vocab_size=args.vocab,
        dim=args.dim,
        num_layers=args.layers,
        num_heads=args.heads,
        max_seq_len=args.seq_len,
        dense_hidden=args.k * args.expert_hidden,  # the baseline's FFN: same active params as k experts
        moe=moe,
    )
    torch.manual_seed(0)
    return DiffusionTransformer(config)


def expected_experts_per_token(model: DiffusionTransformer, args: argparse.Namespace) -> float | None:
    """Mean active experts per token (k for static routers; schedule and EC capacity floor included)."""
    moe = model.config.moe
    if moe is None:
        return None
    router = moe.router
    if router.capacity_schedule is None:
        return float(router.num_experts_per_tok)
    return expected_k(
        router.capacity_schedule,
        router.k_min,
        router.k_max,
        sigma=router.schedule_sigma,
        seq_len=args.seq_len,
        num_experts=router.num_experts,
    )


def param_counts(model: DiffusionTransformer, experts_per_token: float | None) -> tuple[int, int]:
    """(active, total) parameters; routed-expert weights count as E[k]/E active, everything else fully."""
    total = sum(p.numel() for p in model.parameters())
    if experts_per_token is None:
        return total, total
    inactive = 0.0
    for module in model.modules():
        if isinstance(module, MoELayer):
            expert_params = sum(p.numel() for p in module.experts.parameters())
            inactive += expert_params * (1.0 - experts_per_token / module.experts.num_experts)
    return round(total - inactive), total


def make_step(
    model: DiffusionTransformer, input_ids: torch.Tensor, args: argparse.Namespace
) -> tuple[Callable[[], None], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """A closure doing one full training step; it appends (loss, dispatched slots,
    mean over layers of max/mean expert load) per call to the list returned."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(1234)  # same noise draws for every case
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.dtype == "bf16" else (lambda: nullcontext())
    )
    mask_id = model.config.mask_id
    record: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    model.train()

    def step() -> None:
        noised = add_mask_noise(input_ids, mask_id, antithetic=True, generator=generator)
        with autocast():
            out = model(noised.noisy_ids, noised.mask_ratio)
            diffusion = masked_diffusion_loss(out.logits, input_ids, noised.masked, noised.mask_ratio)
            loss = diffusion.loss + out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            counts = [d.counts.float() for d in out.dispatches]
            slots = sum((c.sum() for c in counts), torch.zeros(()))
            imbalance = sum((c.max() / c.mean().clamp_min(1e-9) for c in counts), torch.zeros(())) / max(len(counts), 1)
        record.append((loss.detach(), slots, imbalance))

    return step, record


def timed_round_robin(fns: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Run each fn `warmup` times, then `repeats` rounds of one call each; times in ms.

    Round r starts at case r (mod cases): no case always runs first in a round, or right after the same case.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    tokens = args.batch * args.seq_len
    gen = torch.Generator().manual_seed(0)
    # real tokens never equal mask_id (0)
    input_ids = torch.randint(1, args.vocab, (args.batch, args.seq_len), generator=gen)
    models = {name: build_model(name, args) for name in CASES}
    steps = {name: make_step(m, input_ids, args) for name, m in models.items()}
    times = timed_round_robin({n: fn for n, (fn, _) in steps.items()}, args.repeats, args.warmup)
    med = {n: statistics.median(t) for n, t in times.items()}
    base = med[BASELINE]
    rows = []
    for name, model in models.items():
        ek = expected_experts_per_token(model, args)
        active, total = param_counts(model, ek)
        timed = steps[name][1][-args.repeats :] if args.repeats else []
        slots = [float(s) for _, s, _ in timed]
        imbalance = [float(i) for _, _, i in timed]
        moe_layers = sum(model.config.is_moe_layer(i) for i in range(args.layers))
        rows.append(
            {
                "case": name,
                "router": None if model.config.moe is None else model.config.moe.router.kind,
                "dtype": args.dtype,
                "dtype_reason": args.dtype_reason,
                "tokens": tokens,
                "ms": round(med[name], 3),
                "ms_std": round(statistics.pstdev(times[name]), 3),
                "baseline_ms": round(base, 3),
                "ratio": round(base / med[name], 3),
                "tokens_per_s": round(tokens / med[name] * 1e3, 1),
                "baseline_tokens_per_s": round(tokens / base * 1e3, 1),
                "active_params": active,
                "total_params": total,
                "expected_k": None if ek is None else round(ek, 4),
                "realized_k": (
                    round(statistics.fmean(slots) / (tokens * moe_layers), 4) if slots and moe_layers else None
                ),
                "load_max_over_mean": round(statistics.fmean(imbalance), 3) if moe_layers and imbalance else None,
                "backend": _backend(model),
                "loss": round(float(steps[name][1][-1][0]), 4),
            }
        )
    summary = {
        "summary": True,
        "ec_over_tc_dropless": round(med["ec"] / med["tc_dropless"], 3),
        "ec_over_tc_cf1.25": round(med["ec"] / med["tc_cf1.25"], 3),
        f"ec_{SCHEDULE}_over_ec": round(med[f"ec_{SCHEDULE}"] / med["ec"], 3),
    }
    return rows, summary


def _backend(model: DiffusionTransformer) -> str | None:
    for module in model.modules():
        if isinstance(module, MoELayer):
            return module.experts.resolve_backend(module.config.router.kind == "expert_choice")
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--k", type=int, default=2, help="experts per token (EC's static k); dense width = k·expert_hidden")
    p.add_argument("--expert-hidden", type=int, default=256, help="per-expert FFN width")
    p.add_argument("--k-min", type=int, default=1, help=f"{SCHEDULE} schedule's k_min")
    p.add_argument("--k-max", type=int, default=None, help=f"{SCHEDULE} schedule's k_max (default: FLOPs-matched)")
    p.add_argument("--aux-loss-coef", type=float, default=0.01, help="token choice's Switch aux loss weight")
    p.add_argument("--backend", default="auto", choices=["auto", "loop", "bmm", "grouped_mm"])
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument(
        "--dtype", default="auto", choices=PRECISIONS,
        help="bf16: autocast, fp32 master weights; auto (default): bf16 where this CPU runs it natively, else fp32",
    )  # fmt: skip
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc thresholds alone")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 2 repeats (smoke run)")
    args = p.parse_args(argv)
    precision = resolve_precision(args.dtype, "cpu")
    args.dtype, args.dtype_reason = precision.name, precision.reason  # "bf16" | "fp32" from here on
    if args.quick:
        args.vocab, args.dim, args.layers, args.heads, args.seq_len, args.batch = 64, 32, 2, 2, 16, 2
        args.experts, args.k, args.expert_hidden = 4, 2, 16
        args.repeats, args.warmup = 2, 1
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.k_max is None:
        if args.k_min > args.k:
            p.error(f"--k-min={args.k_min} exceeds --k={args.k}: no k_max can match it")
        args.k_max = solve_k_max(SCHEDULE, args.k_min, args.k, seq_len=args.seq_len, num_experts=args.experts).k_max
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    meta = prepare_benchmark(args.threads, malloc_tuning=not args.no_malloc_tuning)  # for every model timed
    print(
        json.dumps(
            meta
            | {
                "dtype": args.dtype,
                "dtype_reason": args.dtype_reason,
                "hardware": hardware_info().as_dict(),
                "repeats": args.repeats,
                "warmup": args.warmup,
                "shapes": {k: getattr(args, k) for k in SHAPES},
                "schedule": {"name": SCHEDULE, "k_min": args.k_min, "k_max": args.k_max},
                "aux_loss_coef": args.aux_loss_coef,
                "cases": list(CASES),
            }
        ),
        flush=True,
    )
    t0 = time.perf_counter()
    rows, summary = run(args)
    for row in rows:
        print(json.dumps(row), flush=True)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    sys.exit(main())
