"""EC vs TC at equal active FLOPs — EC-DLM's claim: expert choice converges ≈ 2× faster in wall-clock.

Same model, data, seed and experts per token k; only the router differs (z-loss 1e-3 everywhere, as
in every EC-DLM script):

  ec                expert choice, static k: capacity C = ⌊L·k/E⌋ per sequence, no aux loss
  tc_aux_cf1.25     token choice, Switch aux loss α, capacity factor 1.25 (drops by gate)
  tc_aux_dropless   token choice, Switch aux loss α, no capacity limit
  tc_bias_dropless  token choice, loss-free expert bias (update rate u), no capacity limit.
                    EC-DLM ran the bias dropless and at cf 1.25/1.5; dropless here, so the bias
                    alone does the balancing and drops cannot hide an imbalance.

Fair baselines: α ∈ {0.001, 0.01, 0.1} and u ∈ {1e-3, 1e-2} (EC-DLM's 0.01 and 1e-3 among them) are
tuned for this horizon on seed 0 (lowest final validation loss, `runs/tune_*`), then every variant
trains on the paired seeds, in an order rotated per seed. Each finished run is also evaluated with
its routed experts off (`controls.routed_experts_control`).

Wall-clock ratio ("speedup"), per TC variant and seed: the TC run's total training time over the
training time EC needs to first reach that run's final validation loss (linear interpolation between
evaluations). "step_speedup" is the same in optimizer steps, which the machine's load cannot distort.
Training time is Σ step time (metrics.csv `step_s`): validation and checkpoints are excluded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dlmoe.experiments import ExperimentArgs
from dlmoe.experiments.common import (
    Scale,
    VariantRun,
    check_args,
    experiment_scale,
    finite,
    metrics_rows,
    prepare_output,
    rotated,
    scale_overrides,
    seed_stats,
    validation_curve,
)
from dlmoe.experiments.controls import routed_experts_control
from dlmoe.experiments.jobs import JobResult, TrainJob, run_jobs
from dlmoe.experiments.provenance import finish_record, start_record
from dlmoe.experiments.raw_data import Rendered, load_variant_runs, publish, read_raw
from dlmoe.experiments.report_ec_vs_tc import EC, ROUTING_COLUMNS, plot_routing, plot_validation, report
from dlmoe.routing.capacity import ec_capacity

NAME = "ec-vs-tc"
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    EC: ("expert choice, static k", {"model.moe.router.kind": "expert_choice"}),
    "tc_aux_cf1.25": (
        "token choice, aux loss α (tuned), capacity factor 1.25",
        {"model.moe.router.kind": "token_choice", "model.moe.router.aux_loss_coef": 0.01,
         "model.moe.router.capacity_factor": 1.25},
    ),
    "tc_aux_dropless": (
        "token choice, aux loss α (tuned), dropless",
        {"model.moe.router.kind": "token_choice", "model.moe.router.aux_loss_coef": 0.01,
         "model.moe.router.capacity_factor": None},
    ),
    "tc_bias_dropless": (
        "token choice, loss-free expert bias (rate tuned), dropless",
        {"model.moe.router.kind": "token_choice", "model.moe.router.expert_bias": True,
         "model.moe.router.bias_update_rate": 1e-3, "model.moe.router.capacity_factor": None},
    ),
}  # fmt: skip
TC_VARIANTS = tuple(n for n in VARIANTS if n != EC)
# the baselines' balancing strength, tuned for this short horizon on seed 0 (lowest final validation loss);
# the aux coefficient chosen for tc_aux_dropless also applies to tc_aux_cf1.25
TUNING: dict[str, tuple[str, tuple[float, ...], tuple[str, ...]]] = {
    "aux_loss_coef": ("tc_aux_dropless", (0.001, 0.01, 0.1), ("tc_aux_cf1.25", "tc_aux_dropless")),
    "bias_update_rate": ("tc_bias_dropless", (1e-3, 1e-2), ("tc_bias_dropless",)),
}
# laptop: 1200 steps (at 300 the routed experts were worth 0.00 nats, at 1200 0.43 with the preset's k = 4:
# bench/routed_control.py), evaluations every 100 steps for the time-to-loss interpolation
LAPTOP = {"steps": 1200, "eval_every": 100}


def check_static_ec_flops(scale: Scale, *, allow_unmatched: bool) -> float:
    """EC's active experts per token, E·max(⌊L·k/E⌋, 1)/L; refused if it is not k within 1 %."""
    k = scale.experts_per_token
    active = int(ec_capacity(k, scale.seq_len, scale.num_experts)) * scale.num_experts / scale.seq_len
    if abs(active - k) / k > 0.01 and not allow_unmatched:
        raise ValueError(
            f"EC at seq_len={scale.seq_len}, num_experts={scale.num_experts}, k={k} gives {active:.4g} active experts "
            f"per token (capacity floor), not k={k} within 1 %; TC uses exactly k. Choose seq_len·k divisible by "
            "num_experts or pass --allow-unmatched"
        )
    return active


# ----------------------------------------------------------------------------- time to a target loss


@dataclass(frozen=True)
class Reach:
    """When a validation curve first reaches a loss. `at_first_eval`: already below it at the first
    evaluation, so the step/seconds are an upper bound (nothing earlier to interpolate from)."""

    step: float
    seconds: float
    at_first_eval: bool


def time_to_reach(curve: Sequence[tuple[float, float, float]], target: float) -> Reach | None:
    """First (step, train seconds) at which `curve` [(step, seconds, loss), …] reaches `target` loss,
    linear between the two evaluations around the crossing; None if it never does."""
    for i, (step, seconds, loss) in enumerate(curve):
        if loss <= target:
            if i == 0:
                return Reach(step, seconds, True)
            step0, seconds0, loss0 = curve[i - 1]
            frac = (loss0 - target) / (loss0 - loss)
            return Reach(step0 + frac * (step - step0), seconds0 + frac * (seconds - seconds0), False)
    return None


def compare_to_tc(ec_run: VariantRun, tc_run: VariantRun) -> dict[str, Any]:
    """One seed: EC's time to TC's final validation loss against TC's total training time."""
    tc_curve = validation_curve(tc_run.rows)
    tc_step, tc_seconds, target = tc_curve[-1]
    reach = time_to_reach(validation_curve(ec_run.rows), target)
    record: dict[str, Any] = {"seed": tc_run.seed, "target_val_loss": target, "tc_train_s": tc_seconds,
                              "tc_steps": tc_step}  # fmt: skip
    if reach is None:
        best = min(loss for _, _, loss in validation_curve(ec_run.rows))
        reason = f"EC's best validation loss {best:.4f} stays above {target:.4f}"
        return record | {"ec_train_s": None, "ec_steps": None, "speedup": None, "step_speedup": None, "reason": reason}
    return record | {
        "ec_train_s": reach.seconds,
        "ec_steps": reach.step,
        "speedup": tc_seconds / reach.seconds if reach.seconds > 0 else None,
        "step_speedup": tc_step / reach.step,
        "reason": "reached at EC's first evaluation: an upper bound on EC's time" if reach.at_first_eval else None,
    }


def aggregate_comparisons(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean/spread over the seeds where EC reached the target; None with a reason where it never did."""
    reached = [r for r in per_seed if r["ec_train_s"] is not None]
    out: dict[str, Any] = {
        "target_val_loss": seed_stats([r["target_val_loss"] for r in per_seed]),
        "tc_train_s": seed_stats([r["tc_train_s"] for r in per_seed]),
        "reached": f"{len(reached)}/{len(per_seed)}",
        "per_seed": per_seed,
    }
    if not reached:
        reasons = "; ".join(f"seed {r['seed']}: {r['reason']}" for r in per_seed)
        return out | {"ec_train_s": None, "speedup": None, "step_speedup": None, "reason": reasons}
    missed = [r["seed"] for r in per_seed if r["ec_train_s"] is None]
    return out | {
        "ec_train_s": seed_stats([r["ec_train_s"] for r in reached]),
        "speedup": seed_stats([r["speedup"] for r in reached if r["speedup"] is not None]),
        "step_speedup": seed_stats([r["step_speedup"] for r in reached]),
        "reason": f"EC never reached the target for seeds {missed}; statistics over the others" if missed else None,
    }


# ----------------------------------------------------------------------------- run


def planned_steps(args: ExperimentArgs) -> dict[str, int]:
    """Optimizer steps this experiment will train with `args` (dlmoe.experiments.suite)."""
    steps = experiment_scale(args, LAPTOP).steps
    tuning = sum(len(candidates) for _, candidates, _ in TUNING.values()) if args.extra.get("tune", True) else 0
    reused = len(TUNING) if tuning else 0  # the chosen values' tuning runs are the tuned variants' seed 0
    return {"tuning": tuning * steps, "variants": (len(VARIANTS) * args.seeds - reused) * steps}


def run(args: ExperimentArgs) -> dict:
    check_args(args, ("tune",))
    scale = experiment_scale(args, LAPTOP)
    ec_active = check_static_ec_flops(scale, allow_unmatched=args.allow_unmatched)
    options = {"scale": args.scale_name, "scale_values": dataclasses.asdict(scale), "corpus": args.corpus,
               "seeds": args.seeds, "steps": scale.steps, "variants": list(VARIANTS),
               "scaling_factor": args.scaling_factor}  # fmt: skip
    out = prepare_output(args.out, NAME, options, overwrite=args.overwrite)
    record, started = start_record(scale.device, args.jobs), time.perf_counter()
    base = scale_overrides(scale, out / "runs", args.corpus, out / ".cache", scaling_factor=args.scaling_factor)
    tuning = tune_baselines(out, base, args.jobs) if args.extra.get("tune", True) else {}
    variants = tuned_variants(tuning)
    jobs = [  # seed-major: variants of one seed share init, data split and noise; no variant always first
        TrainJob(name, seed, variants[name]) for seed in range(args.seeds) for name in rotated(list(VARIANTS), seed)
    ]
    reused = reusable_tuning_runs(tuning, variants)
    pending = [job for job in jobs if not (job.seed == 0 and job.name in reused)]
    finished = {(job.name, job.seed): done for job, done in
                zip(pending, run_jobs(out, base, pending, workers=args.jobs), strict=True)}  # fmt: skip
    finished |= {(name, 0): adopt_run(out, tune_name, name) for name, tune_name in reused.items()}
    runs: dict[str, list[VariantRun]] = {name: [] for name in VARIANTS}
    controls: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for job in jobs:
        runs[job.name].append(finished[job.name, job.seed].run)
        controls[job.name].append(finished[job.name, job.seed].control)
    results = summarise(runs, scale, ec_active, variants) | {
        "experiment": NAME,
        "options": options,
        "controls": {name: per_seed for name, per_seed in controls.items()},
        "tuning": tuning,
    }
    publish(out, args.report_name(NAME), finite(results), finish_record(record, started), args.results_doc)
    return finite(results)


def tune_baselines(out: Path, base: dict[str, Any], workers: int = 1) -> dict[str, Any]:
    """Per balancing knob, train its TC variant at each candidate value (seed 0, under
    `runs/tune_<knob>_<value>/`) and keep the value with the lowest final validation loss."""
    jobs = [
        TrainJob(f"tune_{knob}_{value}", 0, VARIANTS[variant][1] | {f"model.moe.router.{knob}": value})
        for knob, (variant, candidates, _) in TUNING.items()
        for value in candidates
    ]
    final = {job.name: done.run.final_val_loss for job, done in
             zip(jobs, run_jobs(out, base, jobs, workers=workers, control=False), strict=True)}  # fmt: skip
    tuning = {}
    for knob, (variant, candidates, applies_to) in TUNING.items():
        losses = {repr(value): final[f"tune_{knob}_{value}"] for value in candidates}
        chosen = min(candidates, key=lambda v: losses[repr(v)])
        tuning[knob] = {"variant": variant, "final_val_loss": losses, "chosen": chosen, "applies_to": list(applies_to)}
    return tuning


def reusable_tuning_runs(tuning: dict[str, Any], variants: dict[str, dict[str, Any]]) -> dict[str, str]:
    """{variant: tuning run} where the tuning run of the chosen value is that variant's seed-0 run: the
    same overrides and seed, so training it again would only repeat it."""
    reused = {}
    for knob, tuned in tuning.items():
        name = tuned["variant"]
        if variants[name] == VARIANTS[name][1] | {f"model.moe.router.{knob}": tuned["chosen"]}:
            reused[name] = f"tune_{knob}_{tuned['chosen']}"
    return reused


def adopt_run(out: Path, source: str, name: str) -> JobResult:
    """Copy the finished run `source`/seed0 to `name`/seed0 and measure its routed-experts-off control."""
    target = out / "runs" / name / "seed0"
    shutil.copytree(out / "runs" / source / "seed0", target)
    bins = json.loads((target / "val_bins.json").read_text())["bins"]
    run = VariantRun(name, 0, target, metrics_rows(target), bins)
    return JobResult(run, routed_experts_control(target) | {"seed": 0})


def tuned_variants(tuning: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each variant's overrides with the tuned knob values applied."""
    variants = {name: dict(overrides) for name, (_, overrides) in VARIANTS.items()}
    for knob, tuned in tuning.items():
        for name in tuned["applies_to"]:
            variants[name][f"model.moe.router.{knob}"] = tuned["chosen"]
    return variants


def render(raw_dir: Path) -> Rendered:
    """The report from the archived raw data alone: the aggregated numbers are recomputed from the
    per-run metrics (and must equal results.json), verdicts and plots are drawn from them."""
    results, provenance = read_raw(raw_dir)
    archived = load_variant_runs(raw_dir)  # the tuning runs (tune_*) are reported from results.json
    runs = {name: archived[name] for name in VARIANTS}
    overrides = tuned_variants(results["tuning"])
    derived = finite(summarise(runs, Scale(**results["scale"]), results["ec_active_experts_per_token"], overrides))
    stale = sorted(key for key, value in derived.items() if results.get(key) != value)
    if stale:
        raise ValueError(
            f"{raw_dir}: results.json disagrees with its per-run metrics in {stale}; re-run the experiment"
        )
    validation, val_series = plot_validation(runs, raw_dir / "val_loss.png")
    routing, routing_series = plot_routing(runs, raw_dir / "routing.png")
    markdown = report(results, provenance)
    return Rendered(markdown, [validation, routing], {"val_loss": val_series, "routing": routing_series})


def summarise(
    runs: dict[str, list[VariantRun]], scale: Scale, ec_active: float, overrides: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The aggregated figures of the paired runs (`overrides`: each variant's, tuned knobs applied)."""
    variants: dict[str, Any] = {}
    for name, seed_runs in runs.items():
        per_run = [_run_record(r) for r in seed_runs]
        paired = [r.final_val_loss - e.final_val_loss for r, e in zip(seed_runs, runs[EC], strict=True)]
        variants[name] = {
            "description": VARIANTS[name][0],
            "overrides": overrides[name],
            "active_flops_per_token": seed_runs[0].rows[-1]["active_flops_per_token"],
            **{key: seed_stats([r[key] for r in per_run]) for key in ("final_val_loss", "train_s", "tokens_per_s")},
            **{key: seed_stats([r[key] for r in per_run]) for key in ROUTING_COLUMNS},
            "vs_ec": None if name == EC else seed_stats(paired),  # final val loss − EC's, same seed
            "runs": per_run,
        }
    comparisons = {
        tc: aggregate_comparisons([compare_to_tc(e, t) for e, t in zip(runs[EC], runs[tc], strict=True)])
        for tc in TC_VARIANTS
    }
    summary = {
        "final_val_loss": {name: v["final_val_loss"]["mean"] for name, v in variants.items()},
        "speedup": {tc: (c["speedup"] or {}).get("mean") for tc, c in comparisons.items()},
        "step_speedup": {tc: (c["step_speedup"] or {}).get("mean") for tc, c in comparisons.items()},
    }
    return {
        "scale": dataclasses.asdict(scale),
        "ec_active_experts_per_token": ec_active,
        "variants": variants,
        "time_to_tc_loss": comparisons,
        "summary": summary,
    }


def _run_record(run: VariantRun) -> dict[str, Any]:
    steps = [r for r in run.rows if not math.isnan(r["tokens_per_s"])]
    rates = sorted(r["tokens_per_s"] for r in steps)
    return {
        "seed": run.seed,
        "run_dir": str(Path("runs") / run.name / run.run_dir.name),
        "final_val_loss": run.final_val_loss,
        "train_s": run.rows[-1]["train_s"],
        "tokens_per_s": rates[len(rates) // 2],  # median step: robust to the odd slow step (first step, load)
        **{key: run.mean(key) for key in ROUTING_COLUMNS},
        "curve": [{"step": s, "train_s": t, "val_loss": v} for s, t, v in validation_curve(run.rows)],
    }
