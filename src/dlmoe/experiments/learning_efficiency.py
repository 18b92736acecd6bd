"""`dlmoe experiment learning-efficiency`: how much held-out ELBO a training token buys, per mask-ratio bin.

EC-DLM explains why more expert capacity should go to low-mask-ratio steps: "tokens in low-mask-
ratio contexts exhibit an order-of-magnitude higher learning efficiency". No code exists upstream;
this is our precise version (docs/learning_efficiency.md):

  1. one base checkpoint (--base-run, or an expert-choice run trained at the scale in `out/base`);
  2. per bin [lo, hi) and replicate seed: a copy fine-tuned for N steps with the training noise
     t ~ U[lo, hi), constant LR (the base's lr × min_lr_ratio), loss = mean CE over masked tokens;
  3. efficiency = (held-out ELBO before − after) / (masked training tokens drawn); also per step
     and per training token (masked or not); the held-out per-bin CE change (trained × evaluated bin),
     and "in-bin" efficiency: the CE change on held-out tokens of the trained bin itself, per masked
     training token and per step.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dlmoe._checks import check_float, check_int
from dlmoe.diffusion.validation import NUM_BINS as NUM_VAL_BINS
from dlmoe.experiments import ExperimentArgs
from dlmoe.experiments._fine_tune import (
    ProbeResult,
    ProbeTrainer,
    base_run,
    probe_config,
    probe_overrides,
    run_probe,
)
from dlmoe.experiments.common import (
    check_args,
    finite,
    format_stats,
    markdown_table,
    prepare_output,
    seed_stats,
)
from dlmoe.experiments.provenance import finish_record, start_record
from dlmoe.experiments.raw_data import Rendered, publish, read_raw
from dlmoe.train.init_from import SourceRun

NAME = "learning-efficiency"
BASE_VARIANT = {"model.moe.router.kind": "expert_choice"}  # EC-DLM's model
DEFAULT_BINS = 5
LOSS_WEIGHTING = "masked_mean"  # every loss-bearing token weighs the same: "per masked token" is literal
VARIANTS = ("per_masked_token", "per_step", "per_token", "in_bin_per_masked_token", "in_bin_per_step")
EXTRA_KEYS = ("num_bins",)


def default_steps(steps_of_scale: int) -> int:
    """Fine-tuning steps per probe when --steps is not given: half the scale's training steps."""
    return max(1, steps_of_scale // 2)


def mask_ratio_bins(num_bins: int) -> list[tuple[float, float]]:
    """`num_bins` equal-width bins [lo, hi) covering [0, 1]."""
    check_int("num_bins", num_bins, low=1, high=NUM_VAL_BINS)
    return [(i / num_bins, (i + 1) / num_bins) for i in range(num_bins)]


def efficiency(elbo_before: float, elbo_after: float, *, masked_tokens: int, tokens: int, steps: int) -> dict:
    """ΔELBO = before − after (nats/token; > 0 is learning), and ΔELBO per masked training token, per
    step, and per training token (masked or not)."""
    check_float("elbo_before", elbo_before)
    check_float("elbo_after", elbo_after)
    check_int("masked_tokens", masked_tokens, low=1)
    check_int("tokens", tokens, low=masked_tokens)
    check_int("steps", steps, low=1)
    delta = elbo_before - elbo_after
    return {
        "delta_elbo": delta,
        "per_masked_token": delta / masked_tokens,
        "per_step": delta / steps,
        "per_token": delta / tokens,
    }


def in_bin_efficiency(
    before: Sequence[dict], after: Sequence[dict], bounds: tuple[float, float], *, masked_tokens: int, steps: int
) -> dict:
    """Held-out CE change (before − after) on the validation bins whose centre lies in the trained bin
    `bounds` (weighted by their token counts before), per masked training token and per step; NaN
    when the validation set has no token there."""
    check_int("masked_tokens", masked_tokens, low=1)
    check_int("steps", steps, low=1)
    lo, hi = bounds
    after_ce = {tuple(b["mask_ratio"]): b["ce"] for b in after}
    inside = [b for b in before if lo <= sum(b["mask_ratio"]) / 2 < hi and tuple(b["mask_ratio"]) in after_ce]
    weight = sum(b["tokens"] for b in inside)
    change = (
        sum(b["tokens"] * (b["ce"] - after_ce[tuple(b["mask_ratio"])]) for b in inside) / weight if weight else math.nan
    )
    return {
        "delta_ce_in_bin": change,
        "in_bin_per_masked_token": change / masked_tokens,
        "in_bin_per_step": change / steps,
    }


def ratio(low: float, high: float) -> float:
    """low / high; NaN (undefined) unless the highest bin improved the ELBO (high > 0)."""
    return low / high if high > 0 else math.nan


def ce_change(before: Sequence[dict], after: Sequence[dict]) -> list[float]:
    """Held-out mean masked-token CE, before − after, in each of the 10 validation bins (NaN: bin empty)."""
    index = {round(b["mask_ratio"][0] * NUM_VAL_BINS): b["ce"] for b in before}
    change = [math.nan] * NUM_VAL_BINS
    for b in after:
        i = round(b["mask_ratio"][0] * NUM_VAL_BINS)
        if i in index:
            change[i] = index[i] - b["ce"]
    return change


def _check(args: ExperimentArgs) -> tuple[int, int]:
    """(fine-tuning steps, number of bins); every option checked before anything is written."""
    check_args(args, EXTRA_KEYS)
    steps = default_steps(args.scale.steps) if args.steps is None else args.steps
    num_bins = args.extra.get("num_bins", DEFAULT_BINS)
    mask_ratio_bins(num_bins)
    return steps, num_bins


def run(args: ExperimentArgs) -> dict:
    """Fine-tune one base per mask-ratio bin and seed; write results.json, plots and results.md into args.out."""
    steps, num_bins = _check(args)
    if args.base_run is not None:
        SourceRun.open(args.base_run, name="--base-run")  # a bad path fails before --out is touched
    options = {"scale": args.scale_name, "corpus": args.corpus, "seeds": args.seeds, "steps": steps}
    options |= {"num_bins": num_bins, "base_run": args.base_run, "scaling_factor": args.scaling_factor}
    out = prepare_output(args.out, NAME, options, overwrite=args.overwrite)
    record, started = start_record(args.scale.device), time.perf_counter()
    source, trained = base_run(
        args.base_run, out, args.scale, args.corpus, BASE_VARIANT, scaling_factor=args.scaling_factor
    )
    lr = source.config.train.lr * source.config.train.min_lr_ratio
    shared = probe_overrides(args.scale, steps, lr, eval_every=steps) | {"train.loss_weighting": LOSS_WEIGHTING}
    probes: list[dict[str, Any]] = []
    elbo_before, bins_before = math.nan, []
    for replicate in range(args.seeds):
        for lo, hi in mask_ratio_bins(num_bins):
            run_dir = out / "runs" / f"bin{lo:.2f}-{hi:.2f}_seed{replicate}"
            bounds = {"train.mask_ratio_min": lo, "train.mask_ratio_max": hi}
            trainer = ProbeTrainer(probe_config(source, run_dir, shared | bounds), replicate)
            # the starting point is the same for every probe (same weights, validation batches and noise)
            result = run_probe(trainer, measure_before=not probes)
            if result.before is not None:
                elbo_before, bins_before = result.before["val_loss"], result.before["bins"]
            probes.append(_probe_record(result, (lo, hi), elbo_before, bins_before, out))
    settings = {
        "base_run": str(source.path),
        "base_trained_here": trained,
        "base_router": source.config.model.moe.router.kind if source.config.model.moe else "dense",
        "steps": steps,
        "lr": lr,
        "lr_schedule": "constant",
        "loss_weighting": LOSS_WEIGHTING,
        "batch_size": args.scale.batch_size,
        "seq_len": source.config.data.seq_len,
        "seeds": list(range(args.seeds)),
        "elbo_before": elbo_before,
    }
    results = summarize(probes, mask_ratio_bins(num_bins), settings)
    safe = finite(results)
    publish(out, args.report_name(NAME), safe, finish_record(record, started), args.results_doc)
    return safe


def render(raw_dir: Path) -> Rendered:
    """The report and plots from the archived results.json alone."""
    results, _ = read_raw(raw_dir)
    plots = [plot_efficiency(results, raw_dir / "efficiency.png"), plot_ce_change(results, raw_dir / "ce_change.png")]
    return Rendered(report_markdown(results), plots)


def _probe_record(
    result: ProbeResult, bounds: tuple[float, float], elbo_before: float, bins_before: list, out: Path
) -> dict[str, Any]:
    after = result.after["val_loss"]
    eff = efficiency(elbo_before, after, masked_tokens=result.masked_tokens, tokens=result.tokens, steps=result.steps)
    eff |= in_bin_efficiency(
        bins_before, result.after["bins"], bounds, masked_tokens=result.masked_tokens, steps=result.steps
    )
    return {
        "bin": list(bounds),
        "seed": result.replicate,
        "run_dir": str(result.run_dir.relative_to(out)),
        "elbo_after": after,
        "masked_tokens": result.masked_tokens,
        "tokens": result.tokens,
        "steps": result.steps,
        "t_drawn": result.t_drawn,
        "mean_mask_ratio": result.mean_mask_ratio,
        "train_s": result.rows[-1]["train_s"] if result.rows else math.nan,
        "delta_ce": ce_change(bins_before, result.after["bins"]),
    } | eff


def summarize(probes: list[dict], bins: list[tuple[float, float]], settings: dict) -> dict[str, Any]:
    """Per-bin spread over seeds, lowest/highest-bin ratios, and the trained × evaluated ΔCE matrix."""
    per_bin, matrix = [], []
    for lo, hi in bins:
        runs = [p for p in probes if p["bin"] == [lo, hi]]
        stats = {key: seed_stats([p[key] for p in runs]) for key in ("delta_elbo", "delta_ce_in_bin", *VARIANTS)}
        masked_per_step = statistics.fmean(p["masked_tokens"] / p["steps"] for p in runs)
        per_bin.append({"bin": [lo, hi], "masked_tokens_per_step": masked_per_step} | stats)
        columns = zip(*(p["delta_ce"] for p in runs), strict=True)
        matrix.append([statistics.fmean(c) if all(map(math.isfinite, c)) else math.nan for c in columns])
    low, high = per_bin[0], per_bin[-1]
    seeds = sorted({p["seed"] for p in probes})

    def by_seed(variant: str, bin_: list[float], seed: int) -> float:
        return next(p[variant] for p in probes if p["bin"] == bin_ and p["seed"] == seed)

    ratios, advantage = {}, {}
    for v in VARIANTS:
        per_seed = [ratio(by_seed(v, low["bin"], s), by_seed(v, high["bin"], s)) for s in seeds]
        ratios[v] = {"of_means": ratio(low[v]["mean"], high[v]["mean"]), "per_seed": per_seed}
        advantage[v] = all(by_seed(v, low["bin"], s) > by_seed(v, high["bin"], s) for s in seeds)
    summary = {
        "lowest_bin": low["bin"],
        "highest_bin": high["bin"],
        "ratio_lowest_to_highest": ratios,
        "low_mask_advantage": advantage,
        # the per-masked-token ratio that equal progress per step would give: it only counts tokens
        "equal_progress_ratio": high["masked_tokens_per_step"] / low["masked_tokens_per_step"],
        "paper_claim": "an order of magnitude (about 10x) higher learning efficiency at low mask ratio",
    }
    ce = {"trained_bins": [list(b) for b in bins], "evaluated_bins": _val_bins(), "delta_ce": matrix}
    return {"experiment": NAME, "settings": settings, "probes": probes, "per_bin": per_bin, "ce_change": ce,
            "summary": summary}  # fmt: skip


def _val_bins() -> list[list[float]]:
    return [[i / NUM_VAL_BINS, (i + 1) / NUM_VAL_BINS] for i in range(NUM_VAL_BINS)]


# ----------------------------------------------------------------------------- report


def _pm(stat: dict[str, Any], scale: float = 1.0) -> str:
    """Mean ± std over seeds of `stat` times `scale` (e.g. per 1M tokens)."""
    std = None if stat["std"] is None else stat["std"] * scale
    return format_stats({"mean": stat["mean"] * scale, "std": std})


def report_markdown(results: dict[str, Any]) -> str:
    s, summary = results["settings"], results["summary"]
    rows = [
        {
            "bin [lo, hi)": f"[{b['bin'][0]:.2f}, {b['bin'][1]:.2f})",
            "masked tok/step": round(b["masked_tokens_per_step"]),
            "ΔELBO": _pm(b["delta_elbo"]),
            "per 1M masked tok": _pm(b["per_masked_token"], 1e6),
            "per step": _pm(b["per_step"]),
            "per 1M tok": _pm(b["per_token"], 1e6),
            "in-bin ΔCE": _pm(b["delta_ce_in_bin"]),
            "in-bin per 1M masked tok": _pm(b["in_bin_per_masked_token"], 1e6),
            "in-bin per step": _pm(b["in_bin_per_step"]),
        }
        for b in results["per_bin"]
    ]
    text = [
        f"Base `{s['base_run']}` ({s['base_router']}), held-out ELBO before: {s['elbo_before']:.4f} nats/token. "
        f"Each probe: {s['steps']} steps, constant LR {s['lr']:.3g}, batch {s['batch_size']} × {s['seq_len']}, "
        f"loss {s['loss_weighting']}, seeds {s['seeds']} (mean ± sample std). ΔELBO = before − after (> 0: learned); "
        "in-bin ΔCE = the held-out CE change on tokens whose realized mask ratio lies in the trained bin.",
        "",
        markdown_table(rows, list(rows[0])),
        "",
    ]
    lo, hi = (f"[{a:.2f}, {b:.2f})" for a, b in (summary["lowest_bin"], summary["highest_bin"]))
    for v in VARIANTS:
        r = summary["ratio_lowest_to_highest"][v]
        seeds = ", ".join("undefined" if math.isnan(x) else f"{x:.3g}" for x in r["per_seed"])
        of_means = "undefined" if math.isnan(r["of_means"]) else f"{r['of_means']:.3g}"
        verdict = "higher in every seed" if summary["low_mask_advantage"][v] else "not higher in every seed"
        text.append(
            f"- {v}: lowest bin {lo} / highest bin {hi} = {of_means} (per seed: {seeds}); lowest bin {verdict}."
        )
    text.append(
        f"- Equal progress per step would give a per-masked-token ratio of {summary['equal_progress_ratio']:.3g} "
        "(the masked tokens per step, highest bin / lowest bin). Paper: about 10x."
    )
    ce = results["ce_change"]
    header = ["trained \\ evaluated"] + [f"{a:.1f}–{b:.1f}" for a, b in ce["evaluated_bins"]]
    ce_rows = [
        dict(zip(header, [f"[{t[0]:.2f}, {t[1]:.2f})", *row], strict=True))
        for t, row in zip(ce["trained_bins"], ce["delta_ce"], strict=True)
    ]
    text += ["", "Held-out mean masked-token CE, before − after, by realized mask ratio (nats):", ""]
    text.append(markdown_table(ce_rows, header, digits=3))
    return "\n".join(text)


def plot_efficiency(results: dict[str, Any], path: Path) -> Path:
    """ΔELBO per masked token and per step against the bin centre, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = [(b["bin"][0] + b["bin"][1]) / 2 for b in results["per_bin"]]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    panels = (
        ("per_masked_token", 1e6, "ΔELBO per 1M masked training tokens"),
        ("per_step", 1.0, "ΔELBO per step (∝ per training token)"),
        ("in_bin_per_masked_token", 1e6, "in-bin ΔCE per 1M masked training tokens"),
        ("in_bin_per_step", 1.0, "in-bin ΔCE per step"),
    )
    for ax, (variant, scale, label) in zip(axes.flat, panels, strict=True):
        means = [_finite(b[variant]["mean"]) * scale for b in results["per_bin"]]
        errors = [_finite(b[variant]["std"]) * scale for b in results["per_bin"]]
        ax.errorbar(centres, means, yerr=errors, fmt="o-", capsize=3)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("training mask-ratio bin (centre)")
    fig.suptitle("learning efficiency by training mask ratio (held-out; mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _finite(value: float | None) -> float:
    return 0.0 if value is None or not math.isfinite(value) else value


def plot_ce_change(results: dict[str, Any], path: Path) -> Path:
    """Heat map of the held-out per-bin CE change: rows = trained bin, columns = evaluated bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    ce = results["ce_change"]
    data = np.array(ce["delta_ce"], dtype=float)
    limit = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(data) + 2))
    image = ax.imshow(data, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(ce["evaluated_bins"])), [f"{a:.1f}" for a, _ in ce["evaluated_bins"]])
    ax.set_yticks(range(len(ce["trained_bins"])), [f"[{a:.2f}, {b:.2f})" for a, b in ce["trained_bins"]])
    ax.set_xlabel("evaluated bin (realized mask ratio, lower edge)")
    ax.set_ylabel("trained bin (t)")
    fig.colorbar(image, ax=ax, label="CE before − after (nats; > 0: better)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
