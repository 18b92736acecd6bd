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
"exceeds the seed spread" when its 95 % Student-t interval excludes 0.
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
    format_delta,
    format_stats,
    markdown_table,
    prepare_output,
    rotated,
    scale_overrides,
    seed_stats,
    validation_curve,
)
from dlmoe.experiments.controls import control_line
from dlmoe.experiments.jobs import TrainJob, run_jobs
from dlmoe.experiments.provenance import finish_record, machine_line, start_record
from dlmoe.experiments.raw_data import Rendered, publish, read_raw
from dlmoe.experiments.verdicts import verdict
from dlmoe.routing.schedules import SCHEDULE_NAMES, FlopsMatch, expected_k, flops_match

NAME = "capacity-schedules"
STATIC = "constant"  # the static-k baseline: EC without a schedule
UNMATCHED = ("bell",)  # not FLOPs-matched by design: run only with allow_unmatched
TOLERANCE = 0.01
# laptop: k = 4 so the range [2, 6] leaves the schedules room; 300 steps; more validation for the per-bin CE
LAPTOP = {"steps": 1200, "eval_every": 100, "eval_batches": 12}  # routed experts worth 0.43 nats at 1200 steps
EXTRA = ("schedules", "k_min", "k_max")  # args.extra: a subset of schedules, an explicit k range


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


def planned_steps(args: ExperimentArgs) -> dict[str, int]:
    """Optimizer steps this experiment will train with `args` (dlmoe.experiments.suite)."""
    schedules = select_schedules(args.extra.get("schedules"), allow_unmatched=args.allow_unmatched)
    return {"schedules": len(schedules) * args.seeds * experiment_scale(args, LAPTOP).steps}


def run(args: ExperimentArgs) -> dict:
    check_args(args, EXTRA)
    scale = experiment_scale(args, LAPTOP)
    k = scale.experts_per_token
    k_min, k_max = default_k_range(k, scale.num_experts)
    k_min, k_max = args.extra.get("k_min", k_min), args.extra.get("k_max", k_max)
    schedules = select_schedules(args.extra.get("schedules"), allow_unmatched=args.allow_unmatched)
    matches = match_schedules(
        schedules, k, k_min, k_max, seq_len=scale.seq_len, num_experts=scale.num_experts,
        allow_unmatched=args.allow_unmatched,
    )  # fmt: skip
    options = {
        "scale": args.scale_name,
        "scale_values": dataclasses.asdict(scale),
        "corpus": args.corpus,
        "seeds": args.seeds,
        "steps": scale.steps,
        "schedules": schedules,
        "k_range": [k_min, k_max],
        "allow_unmatched": args.allow_unmatched,
        "scaling_factor": args.scaling_factor,
    }
    out = prepare_output(args.out, NAME, options, overwrite=args.overwrite)
    record, started = start_record(scale.device, args.jobs), time.perf_counter()
    base = scale_overrides(scale, out / "runs", args.corpus, out / ".cache", scaling_factor=args.scaling_factor)
    jobs = [  # seed-major: one seed's schedules share init, data split and noise; no schedule always first
        TrainJob(name, seed, _variant(name, k_min, k_max))
        for seed in range(args.seeds)
        for name in rotated(list(schedules), seed)
    ]
    runs: dict[str, list[VariantRun]] = {name: [] for name in schedules}
    controls: dict[str, list[dict[str, float]]] = {name: [] for name in schedules}
    for job, done in zip(jobs, run_jobs(out, base, jobs, workers=args.jobs), strict=True):
        runs[job.name].append(done.run)
        controls[job.name].append(done.control)
    results = summarise(runs, matches) | {
        "experiment": NAME,
        "options": options,
        "static_k": k,
        "k_range": [k_min, k_max],
        "tolerance": TOLERANCE,
        "controls": {name: controls[name] for name in schedules},
    }
    results = finite(results)
    publish(out, args.report_name(NAME), results, finish_record(record, started), args.results_doc)
    return results


def render(raw_dir: Path) -> Rendered:
    """The report and plots from the archived results.json alone."""
    results, provenance = read_raw(raw_dir)
    plots = [plot_bins(results, raw_dir / "per_bin_loss.png"), plot_final(results, raw_dir / "final_loss.png")]
    return Rendered(report(results, provenance), plots)


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


# ----------------------------------------------------------------------------- report


# EC-DLM: more capacity at low mask ratio wins at matched FLOPs; a schedule's predicted sign of
# (its final loss − static's): −1 where it gives low mask ratios more capacity, +1 where less
PREDICTED_SIGN = {"linear_reverse": -1, "cosine_reverse": -1, "linear": 1, "cosine": 1}


def verdicts(results: dict[str, Any]) -> list:
    """One verdict per schedule whose sign EC-DLM's claim predicts, from the paired per-seed Δ."""
    out = []
    for name, sign in PREDICTED_SIGN.items():
        s = results["schedules"].get(name)
        if s is None or s["vs_static"] is None:
            continue
        more_or_less = "more" if sign < 0 else "less"
        out.append(
            verdict(
                f"{name} ({more_or_less} capacity at low mask ratio) "
                f"{'beats' if sign < 0 else 'trails'} static k at matched FLOPs",
                f"{name} final loss − static final loss ({'< 0' if sign < 0 else '> 0'} predicted)",
                s["vs_static"]["values"],
                predicted_sign=sign,
            )
        )
    return out


def report(results: dict[str, Any], provenance: dict[str, Any]) -> str:
    o, sc = results["options"], results["options"]["scale_values"]
    k_min, k_max = results["k_range"]
    head = (
        f"Scale: dim {sc['dim']}, {sc['num_layers']} layers, E = {sc['num_experts']}, L = {sc['seq_len']}, "
        f"batch {sc['batch_size']}, {sc['steps']} steps; {o['seeds']} seed(s), corpus `{o['corpus']}`. "
        f"Static k = {results['static_k']}; schedules use k ∈ [{k_min}, {k_max}]. E[k]: expected active experts "
        "per token (Binomial mask, rounding, capacity floor), matched within ±1 % unless marked; measured: mean "
        "over training steps. Loss: mean ± std over seeds; Δ: paired difference to static, ± its 95 % interval "
        "(beyond spread = interval excludes 0)."
    )
    rows = []
    for name in results["ranking"]:
        s = results["schedules"][name]
        rows.append(
            {
                "rank": s["rank"],
                "schedule": name + (" (static k)" if name == STATIC else ""),
                "k range": f"[{s['k_min']}, {s['k_max']}]",
                "E[k]": f"{s['expected_k']:.4g}" + ("" if s["matched"] else " (unmatched)"),
                "measured experts/token": format_stats(s["measured_experts_per_token"], 4),
                "final val loss": format_stats(s["final_val_loss"]),
                "Δ vs static": format_delta(s["vs_static"]),
                "beyond seed spread": {True: "yes", False: "no", None: "–"}[s["exceeds_seed_spread"]],
            }
        )

    def label(b: dict[str, Any]) -> str:
        return f"r∈[{b['mask_ratio'][0]:.1f},{b['mask_ratio'][1]:.1f})"

    static_bins = results["schedules"][STATIC]["bins"]
    bin_rows = [{"schedule": "static CE"} | {label(b): format_stats(b["ce"], 3) for b in static_bins}]
    for name in results["ranking"]:
        if name != STATIC:
            bins = results["schedules"][name]["bins"]
            bin_rows.append({"schedule": f"Δ {name}"} | {label(b): format_delta(b["vs_static"]) for b in bins})
    columns = ["schedule"] + [label(b) for b in static_bins]
    return (
        f"{head}\n\n{machine_line(provenance)}\n\n{control_line(results)}\n\n"
        + "".join(f"- {v.line()}\n" for v in verdicts(results))
        + f"\n{markdown_table(rows, list(rows[0]))}\n\n"
        "Validation CE on masked tokens per mask-ratio bin (last evaluation): static, and each schedule's Δ:\n\n"
        f"{markdown_table(bin_rows, columns)}"
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bins(results: dict[str, Any], path: Path) -> Path:
    """Per-mask-ratio-bin CE of every schedule, and its paired difference to static (± seed std)."""
    plt = _pyplot()
    fig, (absolute, delta) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, s) in enumerate(results["schedules"].items()):
        centres = [sum(b["mask_ratio"]) / 2 for b in s["bins"]]
        style = {"color": f"C{i}", "marker": "o", "ms": 3, "label": name}  # one colour per schedule in both panels
        absolute.plot(centres, [b["ce"]["mean"] for b in s["bins"]], **style)
        if name == STATIC:
            delta.axhline(0.0, color=style["color"], lw=1.0, label=f"{name} (reference)")
        else:
            mean = [b["vs_static"]["mean"] for b in s["bins"]]
            std = [b["vs_static"]["std"] or 0.0 for b in s["bins"]]
            delta.errorbar(centres, mean, yerr=std, capsize=2, alpha=0.85, **style)
    absolute.set_ylabel("masked-token CE (nats)")
    delta.set_ylabel("CE − static CE (± seed std)")
    for ax in (absolute, delta):
        ax.set_xlabel("mask ratio r (bin centre)")
        ax.grid(alpha=0.3)
    absolute.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_final(results: dict[str, Any], path: Path) -> Path:
    """Final validation loss per schedule (± seed std), and the paired difference to static (± 95 % interval)."""
    plt = _pyplot()
    names = results["ranking"]
    fig, (loss, delta) = plt.subplots(1, 2, figsize=(11, 4))
    x = list(range(len(names)))
    stats = [results["schedules"][n]["final_val_loss"] for n in names]
    loss.errorbar(x, [s["mean"] for s in stats], yerr=[s["std"] or 0.0 for s in stats], fmt="o", capsize=3)
    diffs = [results["schedules"][n]["vs_static"] for n in names]
    delta.errorbar(
        x, [d["mean"] if d else 0.0 for d in diffs], yerr=[(d or {}).get("ci95") or 0.0 for d in diffs], fmt="o",
        capsize=3,
    )  # fmt: skip
    delta.axhline(0.0, color="black", lw=0.8)
    loss.set_ylabel("final validation ELBO loss (± seed std)")
    delta.set_ylabel("loss − static loss (± 95 % interval)")
    for ax in (loss, delta):
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
