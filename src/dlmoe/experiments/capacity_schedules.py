"""Timestep-dependent EC capacity at matched expected FLOPs — EC-DLM's claim: linear_reverse is best.

Every schedule of `SCHEDULE_NAMES` trains an expert-choice model with k_b = round(k_min + (k_max −
k_min)·s(r_b)) experts per token for a sequence of mask ratio r_b; the baseline "constant" is EC
with the static k (no schedule). The k range keeps EC-DLM's proportions ([8, 32] around k = 20):
k_min = max(1, round(0.4·k)), k_max = 2k − k_min, so E[s] = ½ gives E[k] = k. Before anything
trains, `expected_k` (realized ratio of the Binomial mask, rounding and the EC capacity floor
C = max(⌊L·k/E⌋, 1) included) must match the static model's active experts per token within 1 %;
a schedule that does not (e.g. "bell", E[s] = 2/3) is refused unless `allow_unmatched`, and "bell"
only runs with it. The measured experts per token over training is reported next to E[k].

Ranking: every seed trains every schedule on the same data split, initialisation and validation
noise, so schedules are compared by the paired difference to static per seed; a difference
"exceeds the seed spread" when its 95 % Student-t interval excludes 0. By default the experiment
screens first (seed 0 trains every schedule once) and then trains only static, linear_reverse and the
screen's best other schedule on fresh seeds 1 … N (EC-DLM's headline: linear_reverse is best), so
5 paired seeds cost 3 schedules, not 7; `--option schedules=[...]` trains a chosen set on every seed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dlmoe.experiments import ExperimentArgs
from dlmoe.experiments.common import (
    VariantRun,
    check_args,
    experiment_scale,
    finite,
    prepare_output,
    rotated,
    scale_overrides,
    seed_stats,
    validation_curve,
)
from dlmoe.experiments.jobs import TrainJob, run_jobs
from dlmoe.experiments.provenance import finish_record, start_record
from dlmoe.experiments.raw_data import Rendered, publish, read_raw
from dlmoe.experiments.report_capacity_schedules import plot_bins, plot_final, report
from dlmoe.routing.schedules import SCHEDULE_NAMES, FlopsMatch, expected_k, flops_match

NAME = "capacity-schedules"
STATIC = "constant"  # the static-k baseline: EC without a schedule
UNMATCHED = ("bell",)  # not FLOPs-matched by design: run only with allow_unmatched
TOLERANCE = 0.01
# laptop: k = 4 so the range [2, 6] leaves the schedules room; 300 steps; more validation for the per-bin CE
LAPTOP = {"steps": 1200, "eval_every": 100, "eval_batches": 12}  # routed experts worth 0.43 nats at 1200 steps
EXTRA = ("schedules", "k_min", "k_max", "screen")
BEST = "best"  # the headline's third schedule: the screen's best other than static and linear_reverse
HEADLINE = (STATIC, "linear_reverse", BEST)  # args.extra: a subset of schedules, an explicit k range


def default_k_range(k: int, num_experts: int) -> tuple[int, int]:
    """EC-DLM's proportions around the static k ([8, 32] around 20): k_min = max(1, round(0.4k)), k_max = 2k − k_min."""
    k_min = max(1, round(0.4 * k))
    return k_min, min(num_experts, 2 * k - k_min)


def select_schedules(requested: Sequence[str] | None, *, allow_unmatched: bool) -> list[str]:
    """The schedules to train, static first (always included)."""
    if requested is None:
        names = [s for s in SCHEDULE_NAMES if allow_unmatched or s not in UNMATCHED]
    else:
        if isinstance(requested, str) or not all(isinstance(s, str) for s in requested):
            raise ValueError(f"schedules must be a list of names from {list(SCHEDULE_NAMES)}, got {requested!r}")
        unknown = [s for s in requested if s not in SCHEDULE_NAMES]
        if unknown:
            raise ValueError(f"schedules {unknown} unknown; allowed: {list(SCHEDULE_NAMES)}")
        names = list(dict.fromkeys(requested))
    return [STATIC] + [s for s in names if s != STATIC]


def match_schedules(
    schedules: Sequence[str],
    static_k: int,
    k_min: int,
    k_max: int,
    *,
    seq_len: int,
    num_experts: int,
    allow_unmatched: bool,
) -> dict[str, FlopsMatch]:
    """Expected active experts per token of each schedule against static k (capacity floor included);
    ValueError naming every schedule more than 1 % off, unless `allow_unmatched`."""
    for name, value, high in (("k_min", k_min, num_experts), ("k_max", k_max, num_experts)):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
            raise ValueError(f"{name} must be an int in [1, num_experts={high}], got {value!r}")
    if k_min >= k_max:
        raise ValueError(
            f"k_min must be < k_max for the schedules to differ from static k, got k_min={k_min}, k_max={k_max} "
            f"(static k={static_k}; the laptop default needs experts_per_token >= 2)"
        )
    shape = {"seq_len": seq_len, "num_experts": num_experts}
    target = expected_k(STATIC, static_k, static_k, **shape)
    matches = {STATIC: FlopsMatch(STATIC, static_k, static_k, target, target, 0.0, True)}
    for name in schedules:
        if name != STATIC:
            matches[name] = flops_match(name, k_min, k_max, target, tolerance=TOLERANCE, **shape)
    off = [m for m in matches.values() if not m.matched]
    if off and not allow_unmatched:
        detail = "; ".join(
            f"{m.schedule}: E[k] = {m.expected_k:.4f} vs {target:.4f} ({100 * m.relative_gap:+.2f} %)" for m in off
        )
        raise ValueError(
            f"capacity schedules not FLOPs-matched with static k={static_k} within ±{100 * TOLERANCE:g} % "
            f"(k ∈ [{k_min}, {k_max}], seq_len={seq_len}, num_experts={num_experts}): {detail}. "
            "Pass --allow-unmatched to run them anyway"
        )
    return matches


def _variant(name: str, k_min: int, k_max: int) -> dict[str, Any]:
    router = {"model.moe.router.kind": "expert_choice"}
    if name == STATIC:
        return router
    return router | {"model.moe.router.capacity_schedule": name, "model.moe.router.k_min": k_min,
                     "model.moe.router.k_max": k_max}  # fmt: skip


# ----------------------------------------------------------------------------- run


def _plan(args: ExperimentArgs) -> tuple[list[str], bool]:
    """(the schedules the first stage trains, whether it is a screen). Without an explicit `schedules`
    option the experiment screens: seed 0 trains every FLOPs-matched schedule once, then seeds 1 … N
    train static, linear_reverse and the best other schedule of the screen — chosen on seed 0 and
    compared on fresh seeds, so the choice does not bias the comparison."""
    requested = args.extra.get("schedules")
    screen = args.extra.get("screen", requested is None)
    if not isinstance(screen, bool):
        raise ValueError(f"screen must be true or false, got {screen!r}")
    return select_schedules(requested, allow_unmatched=args.allow_unmatched), screen


def planned_steps(args: ExperimentArgs) -> dict[str, int]:
    """Optimizer steps this experiment will train with `args` (dlmoe.experiments.suite)."""
    schedules, screen = _plan(args)
    steps = experiment_scale(args, LAPTOP).steps
    if screen:
        return {"screen": len(schedules) * steps, "headline": len(HEADLINE) * args.seeds * steps}
    return {"schedules": len(schedules) * args.seeds * steps}


def run(args: ExperimentArgs) -> dict:
    check_args(args, EXTRA)
    scale = experiment_scale(args, LAPTOP)
    k = scale.experts_per_token
    k_min, k_max = default_k_range(k, scale.num_experts)
    k_min, k_max = args.extra.get("k_min", k_min), args.extra.get("k_max", k_max)
    schedules, screen = _plan(args)
    if screen and not set(HEADLINE) <= set(schedules) | {BEST}:
        raise ValueError(f"a screen needs {list(HEADLINE[:2])} among the schedules, got {schedules}")
    matches = match_schedules(
        schedules, k, k_min, k_max, seq_len=scale.seq_len, num_experts=scale.num_experts,
        allow_unmatched=args.allow_unmatched,
    )  # fmt: skip
    options = {"scale": args.scale_name, "scale_values": dataclasses.asdict(scale), "corpus": args.corpus,
               "seeds": args.seeds, "steps": scale.steps, "schedules": schedules, "screen": screen,
               "k_range": [k_min, k_max], "allow_unmatched": args.allow_unmatched,
               "scaling_factor": args.scaling_factor}  # fmt: skip
    out = prepare_output(args.out, NAME, options, overwrite=args.overwrite)
    record, started = start_record(scale.device, args.jobs), time.perf_counter()
    base = scale_overrides(scale, out / "runs", args.corpus, out / ".cache", scaling_factor=args.scaling_factor)
    screened = None
    if screen:
        first = _train(out, base, args.jobs, schedules, [0], k_min, k_max)
        screened = screen_record(first[0])
        schedules = [STATIC, HEADLINE[1], screened["best_other"]]
    runs, controls = _train(out, base, args.jobs, schedules, range(int(screen), int(screen) + args.seeds), k_min,
                            k_max)  # fmt: skip
    results = summarise(runs, {name: matches[name] for name in schedules}) | {
        "experiment": NAME,
        "options": options,
        "static_k": k,
        "k_range": [k_min, k_max],
        "tolerance": TOLERANCE,
        "screen": screened,
        "controls": {name: controls[name] for name in schedules},
    }
    results = finite(results)
    publish(out, args.report_name(NAME), results, finish_record(record, started), args.results_doc)
    return results


def _train(
    out: Path, base: dict[str, Any], workers: int, schedules: Sequence[str], seeds: Sequence[int], k_min: int,
    k_max: int,
) -> tuple[dict[str, list[VariantRun]], dict[str, list[dict[str, float]]]]:  # fmt: skip
    """Every schedule × seed (seed-major; one seed's schedules share init, data split and noise; the
    order rotates per seed so no schedule always runs first): runs and controls per schedule."""
    jobs = [TrainJob(n, seed, _variant(n, k_min, k_max)) for seed in seeds for n in rotated(list(schedules), seed)]
    runs: dict[str, list[VariantRun]] = {name: [] for name in schedules}
    controls: dict[str, list[dict[str, float]]] = {name: [] for name in schedules}
    for job, done in zip(jobs, run_jobs(out, base, jobs, workers=workers), strict=True):
        runs[job.name].append(done.run)
        controls[job.name].append(done.control)
    return runs, controls


def screen_record(runs: dict[str, list[VariantRun]]) -> dict[str, Any]:
    """The screen's one seed per schedule, and the best schedule other than static and linear_reverse."""
    final = {name: seed_runs[0].final_val_loss for name, seed_runs in runs.items()}
    others = [name for name in final if name not in HEADLINE[:2]]
    if not others:
        raise ValueError("the screen needs a schedule other than static and linear_reverse")
    return {
        "seed": 0,
        "final_val_loss": final,
        "best_other": min(others, key=final.__getitem__),
        "ranking": sorted(final, key=final.__getitem__),
        "runs": {name: _run_record(seed_runs[0]) for name, seed_runs in runs.items()},
    }


def render(raw_dir: Path) -> Rendered:
    """The report and plots from the archived results.json alone."""
    results, provenance = read_raw(raw_dir)
    bins, bin_series = plot_bins(results, raw_dir / "per_bin_loss.png")
    final, final_series = plot_final(results, raw_dir / "final_loss.png")
    series = {"per_bin_loss": bin_series, "final_loss": final_series}
    return Rendered(report(results, provenance), [bins, final], series)


def _bin_ce(run: VariantRun) -> dict[tuple[float, float], float]:
    return {tuple(b["mask_ratio"]): b["ce"] for b in run.val_bins}


def summarise(runs: dict[str, list[VariantRun]], matches: dict[str, FlopsMatch]) -> dict[str, Any]:
    static = runs[STATIC]
    bins = sorted({key for r in static for key in _bin_ce(r)})
    schedules: dict[str, Any] = {}
    for name, seed_runs in runs.items():
        m = matches[name]
        measured = seed_stats([r.mean("experts_per_token") for r in seed_runs])
        diffs = [r.final_val_loss - s.final_val_loss for r, s in zip(seed_runs, static, strict=True)]
        vs_static = None if name == STATIC else seed_stats(diffs)
        per_bin = []
        for key in bins:
            own = [_bin_ce(r).get(key, math.nan) for r in seed_runs]
            diff = [o - _bin_ce(s).get(key, math.nan) for o, s in zip(own, static, strict=True)]
            vs = None if name == STATIC else seed_stats(diff)
            per_bin.append({"mask_ratio": list(key), "ce": seed_stats(own), "vs_static": vs})
        schedules[name] = {
            "k_min": m.k_min,
            "k_max": m.k_max,
            "expected_k": m.expected_k,
            "static_expected_k": m.static_k,
            "relative_gap": m.relative_gap,
            "matched": m.matched,
            "measured_experts_per_token": measured,
            "measured_vs_expected": (measured["mean"] - m.expected_k) / m.expected_k,
            "final_val_loss": seed_stats([r.final_val_loss for r in seed_runs]),
            "vs_static": vs_static,
            "exceeds_seed_spread": _beyond_spread(vs_static),
            "bins": per_bin,
            "runs": [_run_record(r) for r in seed_runs],
        }
    ranking = sorted(schedules, key=lambda n: schedules[n]["final_val_loss"]["mean"])
    for rank, name in enumerate(ranking, 1):
        schedules[name]["rank"] = rank
    summary = {
        "ranking": ranking,
        "final_val_loss": {n: s["final_val_loss"]["mean"] for n, s in schedules.items()},
        "vs_static": {n: (s["vs_static"] or {}).get("mean") for n, s in schedules.items() if n != STATIC},
        "exceeds_seed_spread": {n: s["exceeds_seed_spread"] for n, s in schedules.items() if n != STATIC},
    }
    return {"schedules": schedules, "ranking": ranking, "summary": summary}


def _beyond_spread(diff: dict[str, Any] | None) -> bool | None:
    """True when the 95 % interval of the paired difference excludes 0; None without two seeds."""
    if diff is None or diff["ci95"] is None:
        return None
    return abs(diff["mean"]) > diff["ci95"]


def _run_record(run: VariantRun) -> dict[str, Any]:
    return {
        "seed": run.seed,
        "run_dir": str(Path("runs") / run.name / run.run_dir.name),
        "final_val_loss": run.final_val_loss,
        "experts_per_token": run.mean("experts_per_token"),
        "curve": [{"step": s, "train_s": t, "val_loss": v} for s, t, v in validation_curve(run.rows)],
        "bins": run.val_bins,
    }
