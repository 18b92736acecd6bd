"""`dlmoe retrofit --from RUN`: swap a token-choice run's router to expert choice, fine-tune, compare.

EC-DLM: "existing pretrained TC DLMs can be retrofitted to EC by replacing only the router" (no code
upstream). Token and expert choice share every parameter — the router weight W_r [E, D] (logits
x·W_rᵀ) and the experts — so the retrofit is a router-kind change: the weights are loaded as they
are (or W_r re-initialised with `reinit_router`), TC-only state (the loss-free expert bias) is
dropped, TC-only fields are set to their neutral defaults, and EC keeps k (same active FLOPs).
Renormalised softmax TC gates are already EC-DLM's gates (a softmax over the chosen experts).

The control continues token-choice training from the same checkpoint with the same batches, noise,
LR and steps. Both arms are measured before their first step (the loss right after the swap), then
along the fine-tune: validation ELBO per step and per training second, tokens/s, load imbalance.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dlmoe.config import RouterConfig
from dlmoe.experiments import ExperimentArgs
from dlmoe.experiments._fine_tune import (
    REPLICATE_SEED_OFFSET,
    ProbeResult,
    ProbeTrainer,
    base_run,
    probe_config,
    probe_overrides,
    run_probe,
)
from dlmoe.experiments.common import (
    Scale,
    check_args,
    finite,
    format_delta,
    format_stats,
    markdown_table,
    prepare_output,
    rotated,
    seed_stats,
    validation_curve,
)
from dlmoe.experiments.controls import control_line, routed_experts_control
from dlmoe.experiments.plotting import pyplot, save_figure
from dlmoe.experiments.provenance import finish_record, machine_line, start_record
from dlmoe.experiments.raw_data import Rendered, publish, read_raw
from dlmoe.experiments.verdicts import Verdict, verdict
from dlmoe.model.hf import DlmoeForDiffusionLM
from dlmoe.routing.routers import Router
from dlmoe.train.init_from import MODEL_DIR, SourceRun

NAME = "retrofit"
ARMS = ("tc", "ec")  # the token-choice control, the expert-choice retrofit
BASE_VARIANT = {"model.moe.router.kind": "token_choice", "model.moe.router.aux_loss_coef": 0.01}  # TC + LB
TC_ONLY = (
    "score",
    "renormalize",
    "capacity_factor",
    "aux_loss_coef",
    "expert_bias",
    "bias_in_gate",
    "bias_update_rate",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
)
ROUTER_INIT_STD = 0.02  # what Router.__init__ draws W_r with
EXTRA_KEYS = ("reinit_router",)
LAPTOP_BASE = {"steps": 1200, "eval_every": 100}  # the source: long enough that routed experts matter
LAPTOP_ARM_STEPS = 300  # fine-tuning steps per arm at the laptop preset
MEASURES = ("load_max_over_mean", "dropped_fraction", "zero_expert_fraction", "experts_per_token")
_ARM_KEYS = ("val_at_start", "val_final", "tokens_per_s", "step_s", "train_s", *MEASURES)  # per-arm summary


def ec_router_overrides() -> dict[str, Any]:
    """Dotted overrides that turn a token-choice router config into expert choice (TC-only fields neutral)."""
    neutral = RouterConfig()
    return {"model.moe.router.kind": "expert_choice"} | {
        f"model.moe.router.{name}": getattr(neutral, name) for name in TC_ONLY
    }


def check_source(source: SourceRun, name: str = "--from") -> None:
    """A retrofit starts from a token-choice MoE run."""
    moe = source.config.model.moe
    if moe is None:
        raise ValueError(f"{name}={str(source.path)!r} is a dense model (model.moe=null); retrofit needs a MoE run")
    if moe.router.kind != "token_choice":
        raise ValueError(
            f"{name}={str(source.path)!r} already routes with model.moe.router.kind={moe.router.kind!r}; "
            "retrofit converts a token_choice run to expert_choice"
        )


def router_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every router weight W_r [E, D] of `model`, by parameter name."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith("router.weight")}


def reinit_routers(model: nn.Module, seed: int) -> None:
    """Draw every W_r afresh, N(0, 0.02²) as at construction, from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Router):
                fresh = torch.empty(module.weight.shape).normal_(0.0, ROUTER_INIT_STD, generator=generator)
                module.weight.copy_(fresh)


def start_arm(
    source: SourceRun, run_dir: Path, arm: str, replicate: int, overrides: dict[str, Any], *, reinit_router: bool
) -> ProbeTrainer:
    """A fine-tune of `source` at step 0: TC as it was (control) or EC (retrofit, W_r kept unless reinit)."""
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {list(ARMS)}, got {arm!r}")
    router = ec_router_overrides() if arm == "ec" else {}
    trainer = ProbeTrainer(probe_config(source, run_dir, overrides | router), replicate)
    if arm == "ec" and reinit_router:
        reinit_routers(trainer.model, REPLICATE_SEED_OFFSET + replicate)
    return trainer


def default_steps(scale_name: str, steps_of_scale: int) -> int:
    """Fine-tuning steps per arm when --steps is not given: LAPTOP_ARM_STEPS at the laptop preset,
    else the scale's training steps."""
    return LAPTOP_ARM_STEPS if scale_name == "laptop" else steps_of_scale


def base_scale(args: ExperimentArgs) -> Scale:
    """The scale the TC source is trained at when --from is not given (LAPTOP_BASE at laptop)."""
    return dataclasses.replace(args.scale, **LAPTOP_BASE) if args.scale_name == "laptop" else args.scale


def _check(args: ExperimentArgs) -> tuple[int, bool]:
    check_args(args, EXTRA_KEYS)
    reinit = args.extra.get("reinit_router", False)
    if not isinstance(reinit, bool):
        raise ValueError(f"reinit_router must be true or false, got {reinit!r}")
    steps = default_steps(args.scale_name, args.scale.steps) if args.steps is None else args.steps
    return steps, reinit


def planned_steps(args: ExperimentArgs) -> dict[str, int]:
    """Optimizer steps this experiment will train with `args` (dlmoe.experiments.suite)."""
    steps = default_steps(args.scale_name, args.scale.steps) if args.steps is None else args.steps
    return {"source": 0 if args.base_run else base_scale(args).steps, "arms": len(ARMS) * args.seeds * steps}


def run(args: ExperimentArgs) -> dict:
    """Retrofit (or train, then retrofit) a TC run; write results.json, plots and results.md into args.out."""
    steps, reinit = _check(args)
    if args.base_run is not None:  # bad input fails before --out is touched
        check_source(SourceRun.open(args.base_run, name="--from"))
    options = {"scale": args.scale_name, "corpus": args.corpus, "seeds": args.seeds, "steps": steps}
    options |= {"base_run": args.base_run, "reinit_router": reinit, "scaling_factor": args.scaling_factor}
    out = prepare_output(args.out, NAME, options, overwrite=args.overwrite)
    record, started = start_record(args.scale.device, args.jobs), time.perf_counter()
    source, trained = base_run(
        args.base_run, out, base_scale(args), args.corpus, BASE_VARIANT, scaling_factor=args.scaling_factor,
        name="--from",
    )  # fmt: skip
    lr = source.config.train.lr * source.config.train.min_lr_ratio
    shared = probe_overrides(args.scale, steps, lr, eval_every=min(args.scale.eval_every, steps))
    saved = router_weights(DlmoeForDiffusionLM.from_pretrained(source.path / MODEL_DIR))
    arms: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
    controls: dict[str, list[dict[str, Any]]] = {"source": [routed_experts_control(source.path) | {"seed": None}]}
    controls |= {arm: [] for arm in ARMS}
    for replicate in range(args.seeds):
        for arm in rotated(ARMS, replicate):  # neither arm always runs first
            run_dir = out / "runs" / f"{arm}_seed{replicate}"
            trainer = start_arm(source, run_dir, arm, replicate, shared, reinit_router=reinit)
            now = router_weights(trainer.model)
            kept = now.keys() == saved.keys() and all(torch.equal(now[k], saved[k]) for k in saved)
            result = run_probe(trainer, measure_before=True, keep_model=True)  # model/ for the control
            arms[arm].append(_arm_record(result, kept, out))
            controls[arm].append(routed_experts_control(run_dir) | {"seed": replicate})
    settings = {
        "source": str(source.path),
        "source_trained_here": trained,
        "reinit_router": reinit,
        "steps": steps,
        "lr": lr,
        "lr_schedule": "constant",
        "loss_weighting": source.config.train.loss_weighting,
        "seeds": list(range(args.seeds)),
        "tc_router": _router_fields(source),
        "ec_overrides": ec_router_overrides(),
    }
    results = {"experiment": NAME, "settings": settings, "arms": arms, "summary": summarize(arms), "controls": controls}
    results = finite(results)
    publish(out, args.report_name(NAME), results, finish_record(record, started), args.results_doc)
    return results


def render(raw_dir: Path) -> Rendered:
    """The report and plots from the archived results.json alone."""
    results, provenance = read_raw(raw_dir)
    arms = results["arms"]
    plots = [plot_curves(arms, raw_dir / "validation.png"), plot_costs(arms, raw_dir / "throughput_balance.png")]
    series = {
        "validation": {f"{arm} seed {r['seed']}": r["curve"] for arm in ARMS for r in arms[arm]},
        "throughput_balance": {
            key: {f"{arm} s{r['seed']}": r[key] for arm in ARMS for r in arms[arm]}
            for key in ("tokens_per_s", "load_max_over_mean")
        },
    }
    markdown = "\n\n".join([machine_line(provenance), control_line(results), report_markdown(results)])
    return Rendered(markdown, plots, series)


NON_INFERIORITY = 0.01  # "can be retrofitted": EC ends no more than 1 % of TC's final loss above it


def verdicts(arms: dict[str, list[dict[str, Any]]]) -> list[Verdict]:
    """EC-DLM's retrofit claim, paired per seed: (1) the retrofit is no worse than continued TC
    (non-inferiority within NON_INFERIORITY of TC's loss); (2) EC's advantage carries over (EC lower)."""
    pairs = list(zip(arms["tc"], arms["ec"], strict=True))
    claim = "a pretrained TC DLM can be retrofitted to EC by replacing only the router"
    return [
        verdict(
            f"{claim} (no worse than continuing TC)",
            f"TC final − EC final + {NON_INFERIORITY:.0%} of TC final (> 0: EC within the margin)",
            [t["val_final"] * (1 + NON_INFERIORITY) - e["val_final"] for t, e in pairs],
        ),
        verdict(
            f"{claim}, and then trains better than TC",
            "TC final − EC final (> 0: EC better)",
            [t["val_final"] - e["val_final"] for t, e in pairs],
        ),
    ]


def _router_fields(source: SourceRun) -> dict[str, Any]:
    router = source.config.model.moe.router  # type: ignore[union-attr]
    return {"kind": router.kind, "num_experts": router.num_experts, "k": router.num_experts_per_tok} | {
        name: getattr(router, name) for name in TC_ONLY
    }


def _arm_record(result: ProbeResult, router_kept: bool, out: Path) -> dict[str, Any]:
    """One arm of one seed: start and final loss, the validation curve, speed and balance."""
    rows = result.rows
    start = result.before["val_loss"] if result.before else math.nan
    curve = [[0.0, 0.0, start]] + [list(point) for point in validation_curve(rows)]
    record = {
        "seed": result.replicate,
        "run_dir": str(result.run_dir.relative_to(out)),
        "val_at_start": start,
        "val_final": result.after["val_loss"],
        "curve": curve,  # [step, training seconds, validation ELBO]
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows),
        "step_s": statistics.median(r["step_s"] for r in rows),
        "train_s": rows[-1]["train_s"],
        "router_weights_equal_source": router_kept,
    }
    return record | {m: _mean_finite(r[m] for r in rows) for m in MEASURES}


def _mean_finite(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def steps_to_reach(curve: list[list[float]], target: float) -> tuple[float, float]:
    """(step, training seconds) of the first evaluation at or below `target`; NaN if never."""
    return next(((step, seconds) for step, seconds, val in curve if val <= target), (math.nan, math.nan))


def summarize(arms: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Means (± std over seeds) of each arm, the swap cost, EC − TC at the end, and the catch-up point."""
    tc, ec = arms["tc"], arms["ec"]
    catch_up = [steps_to_reach(e["curve"], t["val_final"]) for t, e in zip(tc, ec, strict=True)]
    per_arm = {key: {arm: seed_stats([r[key] for r in arms[arm]]) for arm in ARMS} for key in _ARM_KEYS}
    tokens = per_arm["tokens_per_s"]
    return {
        "val_before_swap": per_arm["val_at_start"]["tc"],  # the source model itself
        "val_after_swap": per_arm["val_at_start"]["ec"],
        "swap_cost": seed_stats([e["val_at_start"] - t["val_at_start"] for t, e in zip(tc, ec, strict=True)]),
        "ec_minus_tc_final": seed_stats([e["val_final"] - t["val_final"] for t, e in zip(tc, ec, strict=True)]),
        "ec_step_reaching_tc_final": [c[0] for c in catch_up],
        "ec_seconds_reaching_tc_final": [c[1] for c in catch_up],
        "throughput_ratio_ec_over_tc": tokens["ec"]["mean"] / tokens["tc"]["mean"],
        "router_weights_kept": all(e["router_weights_equal_source"] for e in ec),
        "per_arm": per_arm,
    }


# ----------------------------------------------------------------------------- report


def report_markdown(results: dict[str, Any]) -> str:
    s, summary = results["settings"], results["summary"]
    per_arm = summary["per_arm"]
    labels = {"tc": "token choice (control)", "ec": "expert choice (retrofit)"}
    rows = [{"arm": labels[arm]} | {key: format_stats(per_arm[key][arm]) for key in _ARM_KEYS} for arm in ARMS]
    catch = ", ".join("never" if x is None else f"{x:.0f}" for x in summary["ec_step_reaching_tc_final"])
    router = "re-initialised" if s["reinit_router"] else "kept bit-exactly"
    return "\n".join(
        [
            f"Source `{s['source']}` (token choice, k={s['tc_router']['k']} of {s['tc_router']['num_experts']}); "
            f"router weights {router}. Each arm: {s['steps']} steps, constant LR {s['lr']:.3g}, loss "
            f"{s['loss_weighting']}, seeds {s['seeds']} (mean ± sample std); validation = held-out ELBO "
            "(nats/token) over t ~ U(0, 1); tokens/s and step_s are medians over steps.",
            "",
            markdown_table(rows, ["arm", *_ARM_KEYS]),
            "",
            f"- Loss right after the swap: {format_stats(summary['val_after_swap'])} (EC) vs "
            f"{format_stats(summary['val_before_swap'])} (the TC source); cost {format_delta(summary['swap_cost'])}.",
            f"- Final EC − TC: {format_delta(summary['ec_minus_tc_final'])} "
            "(± 95 % CI over seeds; negative: the retrofit is better).",
            f"- First EC evaluation at or below TC's final loss, step per seed: {catch}.",
            f"- Throughput EC / TC: {format_stats({'mean': summary['throughput_ratio_ec_over_tc'], 'std': None}, 3)} "
            "(wall-clock, this machine).",
            "",
            *[f"- {v.line()}" for v in verdicts(results["arms"])],
        ]
    )


def plot_curves(arms: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Validation ELBO against fine-tuning steps and against training seconds, both arms, every seed."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colors = {"tc": "tab:blue", "ec": "tab:orange"}
    for arm in ARMS:
        for i, record in enumerate(arms[arm]):
            steps, seconds, vals = zip(*record["curve"], strict=True)
            label = f"{arm} seed {record['seed']}"
            style = ["-", "--", ":", "-."][i % 4]
            axes[0].plot(steps, vals, style, marker="o", color=colors[arm], label=label)
            axes[1].plot(seconds, vals, style, marker="o", color=colors[arm], label=label)
    axes[0].set_xlabel("fine-tuning step")
    axes[1].set_xlabel("training seconds (validation excluded)")
    axes[0].set_ylabel("validation ELBO (nats / token)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("retrofit: token choice → expert choice vs continued token choice")
    save_figure(fig, path)
    return path


def plot_costs(arms: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """Bars: median tokens/s and mean load imbalance (max/mean expert load) per arm, one bar per seed."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in (
        (axes[0], "tokens_per_s", "tokens / s (median over steps)"),
        (axes[1], "load_max_over_mean", "expert load max / mean"),
    ):
        names = [f"{arm} s{r['seed']}" for arm in ARMS for r in arms[arm]]
        values = [r[key] for arm in ARMS for r in arms[arm]]
        colors = ["tab:blue" if n.startswith("tc") else "tab:orange" for n in names]
        ax.bar(names, [0.0 if v is None or not math.isfinite(v) else v for v in values], color=colors)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)
    return path
