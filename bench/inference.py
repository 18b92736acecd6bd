"""Benchmark sampling from a trained MoE diffusion LM: block routing, KV caches, threshold, batching.

Prints a meta line (machine, model size, prompts, ELBO method), then one JSON object per case:
    case, section, setting, baseline, ms, baseline_ms, speedup (= baseline_ms / ms), tokens_per_s,
    baseline_tokens_per_s, moe_ms, baseline_moe_ms, moe_speedup, unique_experts, baseline_unique_experts,
    unique_experts_reduction, num_forwards, baseline_num_forwards, token_agreement, elbo, baseline_elbo,
    elbo_change, repeats, targets, targets_met, target_met, dtype, dtype_reason
and a summary line. Cases (greedy decoding, batch 1, gen 256, block 32 unless said otherwise):
  (a) dMoE block routing (top_p, guard) vs token routing, both with the dual cache and 256 steps.
      Targets: unique experts per layer per forward (dMoE metric, over the decoding block) ≥ 4× fewer,
      MoE-layer time (forward hooks on every MoELayer) ≥ 1.5× less.
  (b) prefix cache, dual cache, threshold τ, dual cache + threshold vs the plain LLaDA sampler (no cache,
      256 steps: one token per step). Target: dual cache + threshold ≥ 4× the plain tokens/s.
  (c) the 8 prompts left-padded into one batch-8 call vs 8 batch-1 calls, same setting.
Every batch-1 setting runs on every prompt; for each prompt the settings run back to back, in an
order rotated from prompt to prompt, so a noisy stretch hits a case and its baseline alike. ms is
the median over the runs (rounds × prompts; (c): rounds), `repeats` says how many.
token_agreement: fraction of generated tokens equal to the baseline's, same prompt. elbo: the
model's negative ELBO (nats per generated token) of each output given its prompt, averaged over
prompts: only generated positions are masked (the prompt stays visible), with the same antithetic
noise draws for every case (see the meta line); elbo_change = elbo − baseline_elbo (> 0: worse).
A block's coreset holds at least max(guard, k) experts, so (a)'s reduction is at most baseline / k
for guard ≤ k; threshold cases only commit more than one token per step where the model is confident.

The model (configs/bench_inference.yaml: E=64, k=8 token choice, d_model 512, 4 layers) is trained
once into runs/bench-inference and reused; prompts are held-out snippets of its validation text. Its
weights run in `--dtype` (auto, the default: bf16 where this CPU runs it natively, AVX512-BF16 / AMX;
fp32 on an AVX2 CPU, which emulates bf16 matmuls ~70x slower); every row says which and why.

    python bench/inference.py                  # trains on first use (~6 min on 2 idle cores), then benches
    python bench/inference.py --threads 1      # steadier timings when other processes share the cores
    python bench/inference.py --run runs/other --rounds 2
    python bench/inference.py --quick          # tiny untrained model, gen 32 (smoke run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from dlmoe.config import BlockRoutingConfig
from dlmoe.model.flops import model_size
from dlmoe.model.transformer import DiffusionTransformer
from dlmoe.moe import MoELayer
from dlmoe.precision import PRECISIONS, Precision, hardware_info, resolve_precision
from dlmoe.runtime import prepare_benchmark
from dlmoe.sampling import SamplerConfig, generate
from inference_setup import ElboCache, pick_prompts, tiny_model, trained_model

ROOT = Path(__file__).resolve().parents[1]
PLAIN, DUAL = "plain", "dual_cache"
TARGETS = {"a": {"unique_experts_reduction": 4.0, "moe_speedup": 1.5}, "b": {"speedup": 4.0}}


@dataclass
class Run:
    """One timed `generate` call."""

    generated: torch.Tensor  # [B, G]
    seconds: float
    moe_seconds: float
    num_forwards: int
    unique_experts: float | None


@dataclass
class Summary:
    """A case's figures over its runs (one run = one timed call producing `tokens` tokens)."""

    ms: float
    moe_ms: float
    tokens: int
    num_forwards: float
    unique_experts: float | None
    outputs: list[torch.Tensor]  # per prompt, [G]
    repeats: int


class MoETimer:
    """Wall time spent inside `MoELayer.forward`, accumulated by pre/post forward hooks."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds, self._start = 0.0, 0.0
        for module in model.modules():
            if isinstance(module, MoELayer):
                module.register_forward_pre_hook(self._enter)
                module.register_forward_hook(self._exit)

    def _enter(self, *_: object) -> None:
        self._start = time.perf_counter()

    def _exit(self, *_: object) -> None:
        self.seconds += time.perf_counter() - self._start


def settings(args: argparse.Namespace) -> dict[str, dict]:
    """Batch-1 sampler settings: name -> `SamplerConfig` options (dual_cache is (a)'s token routing)."""
    g, tau = args.gen_length, args.threshold
    named = {
        PLAIN: {"cache": "none", "steps": g},
        "prefix_cache": {"cache": "prefix", "steps": g},
        DUAL: {"cache": "dual", "steps": g},
        f"threshold_{tau}": {"cache": "none", "threshold": tau},
        f"{DUAL}+threshold_{tau}": {"cache": "dual", "threshold": tau},
    }
    for p in args.top_p:
        named[f"block_routing_p{p}_g{args.guard}"] = {
            "cache": "dual",
            "steps": g,
            "block_routing": BlockRoutingConfig(top_p=p, guard=args.guard),
        }
    return named


# ----------------------------------------------------------------------------- measurement


def timed_generate(
    model: DiffusionTransformer, prompts: list[torch.Tensor], options: dict, args: argparse.Namespace, timer: MoETimer
) -> Run:
    """One greedy `generate` call on `prompts` (left-padded when several), timed end to end."""
    timer.seconds = 0.0
    sampler = SamplerConfig(gen_length=args.gen_length, block_length=args.block_length, temperature=0.0, **options)
    t0 = time.perf_counter()
    result = generate(model, prompts, sampler)
    seconds = time.perf_counter() - t0
    stats = result.stats
    return Run(result.generated.clone(), seconds, timer.seconds, stats.num_forwards, stats.unique_experts)


def warm_up(model: DiffusionTransformer, prompts: list, named: dict, args: argparse.Namespace, timer: MoETimer) -> None:
    """Run every code path once on one block (kernels, allocator, RoPE tables) before timing."""
    short = argparse.Namespace(**{**vars(args), "gen_length": args.block_length})
    for name, options in named.items():
        steps = {"steps": args.block_length} if "steps" in options else {}
        timed_generate(model, prompts[:1], options | steps, short, timer)
        if name in args.batch_settings:
            timed_generate(model, prompts, options | steps, short, timer)


def collect(
    model: DiffusionTransformer, prompts: list[torch.Tensor], named: dict, args: argparse.Namespace, timer: MoETimer
) -> tuple[dict[str, list[list[Run]]], dict[str, list[Run]]]:
    """(runs[setting][prompt] over rounds, batch_runs[setting] over rounds).

    Per prompt every setting runs once, starting at a rotating setting; the batch-8 calls of a
    round run between its middle prompts, so both sides of (c) see the same stretch of time."""
    names = list(named)
    runs = {name: [[] for _ in prompts] for name in names}
    batch_runs: dict[str, list[Run]] = {name: [] for name in args.batch_settings}
    turn, started = 0, time.perf_counter()
    for round_ in range(args.rounds):
        for i, prompt in enumerate(prompts):
            if i == len(prompts) // 2:
                for name in args.batch_settings:
                    batch_runs[name].append(timed_generate(model, prompts, named[name], args, timer))
            for name in names[turn % len(names) :] + names[: turn % len(names)]:
                runs[name][i].append(timed_generate(model, [prompt], named[name], args, timer))
            turn += 1
            done = f"round {round_ + 1}/{args.rounds}, prompt {i + 1}/{len(prompts)}"
            print(f"{done} done after {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return runs, batch_runs


# ----------------------------------------------------------------------------- rows


def summarize(units: list[list[Run]], outputs: list[torch.Tensor], tokens: int) -> Summary:
    """Medians over timed units (a unit: the runs whose times add up to one measurement)."""
    unique = [r.unique_experts for unit in units for r in unit if r.unique_experts is not None]
    return Summary(
        ms=statistics.median(sum(r.seconds for r in unit) for unit in units) * 1e3,
        moe_ms=statistics.median(sum(r.moe_seconds for r in unit) for unit in units) * 1e3,
        tokens=tokens,
        num_forwards=statistics.fmean(sum(r.num_forwards for r in unit) for unit in units),
        unique_experts=statistics.fmean(unique) if unique else None,
        outputs=outputs,
        repeats=len(units),
    )


def _ratio(num: float | None, den: float | None) -> float | None:
    return None if num is None or den is None or den <= 0 else round(num / den, 3)


def targets_for(section: str, setting: str) -> dict[str, float]:
    """(a): every block-routing setting; (b): only dual cache + threshold; (c): none."""
    if section == "b" and not setting.startswith(f"{DUAL}+threshold"):
        return {}
    return TARGETS.get(section, {})


def make_row(
    section: str, case: str, setting: str, baseline: str, c: Summary, b: Summary, prompts: list, elbo: ElboCache
) -> dict:
    """One JSON object: a case next to its baseline, with the section's targets checked."""
    agree = torch.cat([x == y for x, y in zip(c.outputs, b.outputs, strict=True)]).float().mean()
    c_elbo, b_elbo = elbo.mean(prompts, c.outputs), elbo.mean(prompts, b.outputs)
    row = {"case": case, "section": section, "setting": setting, "baseline": baseline}
    pairs = {
        "ms": (c.ms, b.ms),
        "tokens_per_s": (c.tokens / c.ms * 1e3, b.tokens / b.ms * 1e3),
        "moe_ms": (c.moe_ms, b.moe_ms),
        "unique_experts": (c.unique_experts, b.unique_experts),
        "num_forwards": (c.num_forwards, b.num_forwards),
        "elbo": (c_elbo, b_elbo),
        "repeats": (c.repeats, b.repeats),
    }
    for key, (value, base) in pairs.items():
        row[key], row[f"baseline_{key}"] = (None if v is None else round(v, 4) for v in (value, base))
    row |= {
        "speedup": _ratio(b.ms, c.ms),
        "moe_speedup": _ratio(b.moe_ms, c.moe_ms),
        "unique_experts_reduction": _ratio(b.unique_experts, c.unique_experts),
        "token_agreement": round(float(agree), 4),
        "elbo_change": round(c_elbo - b_elbo, 4),
    }
    targets = targets_for(section, setting)
    met = {name: row[name] is not None and row[name] >= low for name, low in targets.items()}
    return row | {"targets": targets, "targets_met": met, "target_met": all(met.values()) if met else None}


def rows_for(
    runs: dict, batch_runs: dict, named: dict, prompts: list[torch.Tensor], elbo: ElboCache, args: argparse.Namespace
) -> list[dict]:
    """The (a), (b) and (c) rows."""
    outputs = {name: [per_prompt[0].generated[0] for per_prompt in r] for name, r in runs.items()}
    s = {name: summarize([[x] for p in r for x in p], outputs[name], args.gen_length) for name, r in runs.items()}
    rows = [
        make_row("a", f"a/{name}", name, f"token_routing ({DUAL})", s[name], s[DUAL], prompts, elbo)
        for name in named
        if name.startswith("block_routing")
    ]
    rows += [
        make_row("b", f"b/{name}", name, PLAIN, s[name], s[PLAIN], prompts, elbo)
        for name in named
        if name != PLAIN and not name.startswith("block_routing")
    ]
    tokens = args.gen_length * len(prompts)
    for name in args.batch_settings:
        batch = batch_runs[name]
        case = summarize([[r] for r in batch], list(batch[0].generated), tokens)
        base = summarize([[p[k] for p in runs[name]] for k in range(len(batch))], outputs[name], tokens)
        rows.append(
            make_row("c", f"c/batch{len(prompts)}_{name}", name, f"{len(prompts)}x_batch1", case, base, prompts, elbo)
        )
    return rows


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=str(ROOT / "runs" / "bench-inference"), help="run folder (trained if empty)")
    p.add_argument("--config", default=str(ROOT / "configs" / "bench_inference.yaml"), help="config to train with")
    p.add_argument("--retrain", action="store_true", help="train again even if the run holds a model")
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--block-length", type=int, default=32)
    p.add_argument("--threshold", type=float, default=0.9, help="Fast-dLLM confidence threshold τ")
    p.add_argument("--top-p", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="block routing top_p values")
    p.add_argument("--guard", type=int, default=8, help="block routing: minimum coreset size")
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[16, 20, 24, 28, 32, 36, 40, 44])
    p.add_argument("--batch-settings", nargs="+", default=None, help="settings for (c) (default: dual cache ± τ)")
    p.add_argument("--rounds", type=int, default=1, help="timed generations per setting and prompt")
    p.add_argument("--elbo-draws", type=int, default=16, help="antithetic noise draws per ELBO estimate")
    p.add_argument("--elbo-chunk", type=int, default=8, help="draws per ELBO forward")
    p.add_argument("--seed", type=int, default=0, help="seed of the ELBO noise (and quick-mode prompts)")
    p.add_argument(
        "--dtype", default="auto", choices=PRECISIONS,
        help="weight dtype at inference; auto (default): bf16 where this CPU runs it natively, else fp32",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc thresholds alone")
    p.add_argument("--quick", action="store_true", help="tiny untrained model, gen 32, 1 round (smoke run)")
    args = p.parse_args(argv)
    args.precision = resolve_precision(args.dtype, "cpu")
    if args.quick:
        args.gen_length, args.block_length, args.guard, args.rounds = 32, 16, 2, 1
        args.prompt_lengths, args.elbo_draws, args.elbo_chunk = [4, 5, 6, 7, 8, 9, 10, 11], 4, 4
    args.batch_settings = args.batch_settings or [DUAL, f"{DUAL}+threshold_{args.threshold}"]
    if args.rounds < 1 or args.elbo_draws < 1 or args.elbo_chunk < 1:
        p.error("--rounds, --elbo-draws and --elbo-chunk must be >= 1")
    unknown = set(args.batch_settings) - set(settings(args))
    if unknown:
        p.error(f"unknown --batch-settings {sorted(unknown)}; choose from {list(settings(args))}")
    return args


def model_summary(model: DiffusionTransformer, args: argparse.Namespace) -> dict:
    """Architecture and total / active parameters (active: k of E routed experts)."""
    c, router = model.config, model.config.moe.router
    size = model_size(c, args.gen_length + max(args.prompt_lengths))
    shape = {"dim": c.dim, "layers": c.num_layers, "heads": c.num_heads, "vocab": c.vocab_size}
    moe = {"experts": router.num_experts, "k": router.num_experts_per_tok, "expert_hidden": c.moe.expert_hidden}
    moe["router"] = f"{router.kind}, {router.score}, capacity_factor={router.capacity_factor}"
    return (
        shape
        | moe
        | {"dtype": args.precision.name, "total_params": size.total_params, "active_params": round(size.active_params)}
    )


def describe(options: dict) -> dict:
    """JSON-friendly `generate` options."""
    block = options.get("block_routing")
    return options | ({"block_routing": {"top_p": block.top_p, "guard": block.guard}} if block else {})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    meta = prepare_benchmark(args.threads, malloc_tuning=not args.no_malloc_tuning)
    if args.quick:
        model, facts = tiny_model(), {"run": None, "trained_now": False}
        gen = torch.Generator().manual_seed(args.seed)
        prompts = [torch.randint(3, model.config.vocab_size, (n,), generator=gen) for n in args.prompt_lengths]
    else:
        model, rows, facts = trained_model(args)
        prompts = pick_prompts(rows, args.prompt_lengths, first_real_id=3)  # ids 0-2: mask, EOS, pad
    precision: Precision = args.precision
    model = model.to(precision.dtype).eval()
    if model.config.moe is None:
        raise SystemExit("the bench needs an MoE model; this one is dense")
    if max(args.prompt_lengths) + args.gen_length > model.config.max_seq_len:
        raise SystemExit(f"prompts + gen_length exceed the model's max_seq_len={model.config.max_seq_len}")
    named = settings(args)
    elbo_note = f"generated positions masked, prompt visible; {args.elbo_draws} antithetic t, seed {args.seed}"
    print(
        json.dumps(
            meta
            | facts
            | {
                "model": model_summary(model, args),
                "dtype": precision.name,
                "dtype_reason": precision.reason,
                "hardware": hardware_info().as_dict(),
                "gen_length": args.gen_length,
                "block_length": args.block_length,
                "prompt_lengths": [int(p.numel()) for p in prompts],
                "rounds": args.rounds,
                "settings": {name: describe(options) for name, options in named.items()},
                "elbo": elbo_note + "; nats per generated token",
                "decoding": "greedy (temperature 0), low_confidence remasking",
            }
        ),
        flush=True,
    )
    with torch.inference_mode():
        timer = MoETimer(model)
        warm_up(model, prompts, named, args, timer)
        runs, batch_runs = collect(model, prompts, named, args, timer)
        rows = rows_for(runs, batch_runs, named, prompts, ElboCache(model, args), args)
    for row in rows:
        print(json.dumps(row | {"dtype": precision.name, "dtype_reason": precision.reason}), flush=True)
    summary = {"summary": True, "targets_met": {r["case"]: r["target_met"] for r in rows if r["targets"]}}
    print(json.dumps(summary | {"wall_s": round(time.perf_counter() - started, 1)}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
