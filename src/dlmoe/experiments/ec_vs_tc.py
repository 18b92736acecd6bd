"""EC vs TC at equal active FLOPs — EC-DLM's claim: expert choice converges ≈ 2× faster in wall-clock.

Same model, data, seed and experts per token k; only the router differs (z-loss 1e-3 everywhere, as
in every EC-DLM script):

  ec                expert choice, static k: capacity C = ⌊L·k/E⌋ per sequence, no aux loss
  tc_aux_cf1.25     token choice, aux loss α = 0.01, capacity factor 1.25 (drops by gate)
  tc_aux_dropless   token choice, aux loss α = 0.01, no capacity limit
  tc_bias_dropless  token choice, loss-free expert bias (update rate 1e-3), no capacity limit.
                    EC-DLM ran the bias dropless and at cf 1.25/1.5; dropless here, so the bias
                    alone does the balancing and drops cannot hide an imbalance.

Wall-clock ratio ("speedup"), per TC variant and seed: the TC run's total training time over the
training time EC needs to first reach that run's final validation loss (linear interpolation between
evaluations). "step_speedup" is the same in optimizer steps, which the machine's load cannot distort.
Training time is Σ step time (metrics.csv `step_s`): validation and checkpoints are excluded.
"""

from __future__ import annotations

import dataclasses
import math
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
    finish_report,
    finite,
    format_delta,
    format_stats,
    markdown_table,
    prepare_output,
    scale_overrides,
    seed_stats,
    train_variant,
    validation_curve,
)
from dlmoe.routing.schedules import ec_capacity

NAME = "ec-vs-tc"
EC = "ec"
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    EC: ("expert choice, static k", {"model.moe.router.kind": "expert_choice"}),
    "tc_aux_cf1.25": (
        "token choice, aux loss 0.01, capacity factor 1.25",
        {"model.moe.router.kind": "token_choice", "model.moe.router.aux_loss_coef": 0.01,
         "model.moe.router.capacity_factor": 1.25},
    ),
    "tc_aux_dropless": (
        "token choice, aux loss 0.01, dropless",
        {"model.moe.router.kind": "token_choice", "model.moe.router.aux_loss_coef": 0.01,
         "model.moe.router.capacity_factor": None},
    ),
    "tc_bias_dropless": (
        "token choice, loss-free expert bias (rate 1e-3), dropless",
        {"model.moe.router.kind": "token_choice", "model.moe.router.expert_bias": True,
         "model.moe.router.bias_update_rate": 1e-3, "model.moe.router.capacity_factor": None},
    ),
}  # fmt: skip
TC_VARIANTS = tuple(n for n in VARIANTS if n != EC)
# laptop: 300 steps (150 barely leave warmup behind), evaluations every 25 steps for the time-to-loss interpolation
LAPTOP = {"steps": 300, "eval_every": 25}
ROUTING_COLUMNS = ("load_max_over_mean", "dropped_fraction", "zero_expert_fraction", "experts_per_token")


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


def run(args: ExperimentArgs) -> dict:
    check_args(args)
    scale = experiment_scale(args, LAPTOP)
    ec_active = check_static_ec_flops(scale, allow_unmatched=args.allow_unmatched)
    options = {"scale": args.scale_name, "scale_values": dataclasses.asdict(scale), "corpus": args.corpus,
               "seeds": args.seeds, "steps": scale.steps, "variants": list(VARIANTS),
               "scaling_factor": args.scaling_factor}  # fmt: skip
    out = prepare_output(args.out, NAME, options, overwrite=args.overwrite)
    base = scale_overrides(scale, out / "runs", args.corpus, out / ".cache", scaling_factor=args.scaling_factor)
    runs: dict[str, list[VariantRun]] = {name: [] for name in VARIANTS}
    for seed in range(args.seeds):  # seed-major: variants of one seed share init, data split and noise
        for name, (_, overrides) in VARIANTS.items():
            runs[name].append(train_variant(out, name, seed, base, overrides))
    results = summarise(runs, scale, ec_active) | {"experiment": NAME, "options": options}
    plots = [plot_validation(runs, out / "val_loss.png"), plot_routing(runs, out / "routing.png")]
    results = finite(results)
    finish_report(out, args.report_name(NAME), results, report(results), plots, args.results_doc)
    return results


def summarise(runs: dict[str, list[VariantRun]], scale: Scale, ec_active: float) -> dict[str, Any]:
    variants: dict[str, Any] = {}
    for name, seed_runs in runs.items():
        per_run = [_run_record(r) for r in seed_runs]
        paired = [r.final_val_loss - e.final_val_loss for r, e in zip(seed_runs, runs[EC], strict=True)]
        variants[name] = {
            "description": VARIANTS[name][0],
            "overrides": VARIANTS[name][1],
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


# ----------------------------------------------------------------------------- report


def report(results: dict[str, Any]) -> str:
    scale = results["scale"]
    head = (
        f"Scale: dim {scale['dim']}, {scale['num_layers']} layers, E = {scale['num_experts']}, "
        f"k = {scale['experts_per_token']}, L = {scale['seq_len']}, batch {scale['batch_size']}, "
        f"{scale['steps']} steps; {results['options']['seeds']} seed(s), corpus `{results['options']['corpus']}`. "
        "Values are mean ± std over seeds (seeds change initialisation, batch order and noise; the data split "
        "is fixed by data.split_seed); Δ vs ec: paired per seed, ± its 95 % interval. Routing figures are means over "
        "training steps; experts/token is measured (TC capacity drops lower it). "
        "Training time excludes validation; wall-clock figures depend on the machine and its load."
    )
    rows = [
        {
            "variant": name,
            "router": v["description"],
            "final val loss": format_stats(v["final_val_loss"]),
            "Δ vs ec": format_delta(v["vs_ec"]),
            "train s": format_stats(v["train_s"], 3),
            "tokens/s": format_stats(v["tokens_per_s"], 3),
            "load max/mean": format_stats(v["load_max_over_mean"], 3),
            "dropped slots": format_stats(v["dropped_fraction"], 2),
            "tokens w/o expert": format_stats(v["zero_expert_fraction"], 2),
            "experts/token": format_stats(v["experts_per_token"], 3),
        }
        for name, v in results["variants"].items()
    ]
    columns = list(rows[0])
    speed = [
        {
            "TC variant": tc,
            "TC final loss": format_stats(c["target_val_loss"]),
            "TC train s": format_stats(c["tc_train_s"], 3),
            "EC train s to that loss": format_stats(c["ec_train_s"], 3),
            "wall-clock speedup": format_stats(c["speedup"], 3),
            "step speedup": format_stats(c["step_speedup"], 3),
            "seeds reached": c["reached"],
            "note": c["reason"] or "",
        }
        for tc, c in results["time_to_tc_loss"].items()
    ]
    return (
        f"{head}\n\n{markdown_table(rows, columns)}\n\n"
        "Time for EC to reach each TC variant's final validation loss (speedup = TC time / EC time, > 1: EC "
        "faster; interpolated between evaluations):\n\n"
        f"{markdown_table(speed, list(speed[0]))}"
    )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _mean_curve(seed_runs: list[VariantRun]) -> tuple[list[float], list[float], list[float], list[float]]:
    """Mean over seeds of each evaluation's (step, seconds, loss), and the loss std (0 for one seed)."""
    curves = [validation_curve(r.rows) for r in seed_runs]
    n = min(len(c) for c in curves)
    points = [[c[i] for c in curves] for i in range(n)]
    steps = [sum(p[0] for p in pts) / len(pts) for pts in points]
    seconds = [sum(p[1] for p in pts) / len(pts) for pts in points]
    stats = [seed_stats([p[2] for p in pts]) for pts in points]
    return steps, seconds, [s["mean"] for s in stats], [s["std"] or 0.0 for s in stats]


def plot_validation(runs: dict[str, list[VariantRun]], path: Path) -> Path:
    """Validation loss against optimizer steps and against training wall-clock (mean ± std over seeds)."""
    plt = _pyplot()
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, seed_runs in runs.items():
        steps, seconds, loss, std = _mean_curve(seed_runs)
        by_step.errorbar(steps, loss, yerr=std, marker="o", ms=3, capsize=2, label=name)
        by_time.errorbar(seconds, loss, yerr=std, marker="o", ms=3, capsize=2, label=name)
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("training wall-clock (s, validation excluded)")
    by_step.set_ylabel("validation ELBO loss (nats / token)")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_step.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _smooth(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if not math.isnan(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def plot_routing(runs: dict[str, list[VariantRun]], path: Path) -> Path:
    """Load imbalance, dropped slots and tokens without an expert over training (seed mean, moving average)."""
    plt = _pyplot()
    panels = (
        ("load_max_over_mean", "max / mean expert load"),
        ("dropped_fraction", "dropped token-slots (TC capacity)"),
        ("zero_expert_fraction", "tokens with no routed expert"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.8))
    for name, seed_runs in runs.items():
        n = min(len(r.rows) for r in seed_runs)
        steps = [seed_runs[0].rows[i]["step"] for i in range(n)]
        window = max(1, n // 30)
        for ax, (column, _) in zip(axes, panels, strict=True):
            mean = [sum(r.rows[i][column] for r in seed_runs) / len(seed_runs) for i in range(n)]
            ax.plot(steps, _smooth(mean, window), label=name)
    for ax, (_, title) in zip(axes, panels, strict=True):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
