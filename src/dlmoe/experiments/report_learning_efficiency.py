"""learning-efficiency's report: verdicts, tables and plots from the archived results.json alone.

Rendered by `learning_efficiency.render` (`dlmoe.experiments.raw_data`). Every plot is drawn from
`series` (returned with the report and archived as plots.json), so what a figure shows is on record.
Efficiencies are printed per 1M masked training tokens.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dlmoe.diffusion.validation import NUM_BINS as NUM_VAL_BINS
from dlmoe.experiments.common import finite, format_stats, markdown_table
from dlmoe.experiments.controls import control_line
from dlmoe.experiments.learning_efficiency import CLAIM_FACTOR, PER_MILLION, nan_for_null
from dlmoe.experiments.plotting import pyplot, save_figure
from dlmoe.experiments.provenance import machine_line
from dlmoe.experiments.raw_data import Rendered
from dlmoe.experiments.verdicts import INCONCLUSIVE, Verdict

EVALUATION = {  # what each variant scores a probe on: only a common evaluation makes a ratio like-for-like
    "per_masked_token": "whole held-out ELBO (same for every probe)",
    "per_step": "whole held-out ELBO (same for every probe)",
    "per_token": "whole held-out ELBO (same for every probe)",
    "in_bin_per_masked_token": "each probe's own bins (different evaluations: not like-for-like)",
    "in_bin_per_step": "each probe's own bins (different evaluations: not like-for-like)",
}


def render_report(results: dict[str, Any], provenance: dict[str, Any], raw_dir: Path) -> Rendered:
    """Markdown, the three plots (written into `raw_dir`) and the series they draw."""
    series = plot_series(results)
    plots = [
        plot_efficiency(series["efficiency"], raw_dir / "efficiency.png"),
        plot_same_bin(series["same_bin"], raw_dir / "same_bin.png"),
        plot_ce_change(series["ce_change"], raw_dir / "ce_change.png"),
    ]
    return Rendered(report_markdown(results, provenance), plots, series)


# ----------------------------------------------------------------------------- markdown


def _bin(bounds: list[float], digits: int = 2) -> str:
    return f"[{bounds[0]:.{digits}f}, {bounds[1]:.{digits}f})"


def _pm(stat: dict[str, Any] | None, scale: float = 1.0) -> str:
    """Mean ± std over seeds of `stat` times `scale` (e.g. per 1M tokens)."""
    if stat is None or stat["mean"] is None:
        return "–"
    std = None if stat["std"] is None else stat["std"] * scale
    return format_stats({"mean": stat["mean"] * scale, "std": std})


def _number(value: float | None) -> str:
    return "undefined" if value is None or not math.isfinite(value) else f"{value:.3g}"


def report_markdown(results: dict[str, Any], provenance: dict[str, Any]) -> str:
    s = results["settings"]
    trained = f"trained here for {s['base_steps']} steps" if s["base_trained_here"] else f"{s['base_steps']} steps"
    head = (
        f"Base `{s['base_run']}` ({s['base_router']}, {trained}), held-out ELBO before: {s['elbo_before']:.4f} "
        f"nats/token on V = {s['eval_rows']} validation rows. Each probe: {s['steps']} steps, constant LR "
        f"{s['lr']:.3g}, batch {s['batch_size']} × {s['seq_len']}, loss {s['loss_weighting']}, "
        f"{len(s['seeds'])} replicate seed(s) per bin (mean ± sample std). Every probe is scored on the same V with "
        "the same masks; ΔELBO = before − after (> 0: learned)."
    )
    parts = [head, machine_line(provenance), control_line(results), _headline(results), _bin_table(results)]
    parts += [_ratio_lines(results), *_same_bin_section(results), *_ce_section(results)]
    return "\n\n".join(parts)


def _headline(results: dict[str, Any]) -> str:
    summary = results["summary"]
    r = summary["ratio_lowest_to_highest"][summary["headline"]]
    lines = [
        f"Headline: the whole held-out ELBO gain per masked training token, lowest trained bin "
        f"{_bin(summary['lowest_bin'])} against highest {_bin(summary['highest_bin'])} on the same evaluation, "
        "paired per seed:",
        "",
        *(f"- {Verdict(**v).line()}" for v in summary["verdicts"]),
        f"- Ratio lowest / highest: {_number(r['of_means'])} of the means "
        f"(per seed: {', '.join(_number(x) for x in r['per_seed'])}). Equal progress per step would already give "
        f"{summary['equal_progress_ratio']:.3g}: the masked tokens per step, highest bin / lowest bin.",
    ]
    return "\n".join(lines)


def _bin_table(results: dict[str, Any]) -> str:
    rows = [
        {
            "trained bin": _bin(b["bin"]),
            "masked tok/step": round(b["masked_tokens_per_step"]),
            "ΔELBO": _pm(b["delta_elbo"]),
            "ΔELBO per 1M masked tok": _pm(b["per_masked_token"], PER_MILLION),
            "ΔELBO per step": _pm(b["per_step"]),
            "ΔELBO per 1M tok": _pm(b["per_token"], PER_MILLION),
            "in-bin ΔCE": _pm(b["delta_ce_in_bin"]),
            "in-bin per 1M masked tok": _pm(b["in_bin_per_masked_token"], PER_MILLION),
            "in-bin per step": _pm(b["in_bin_per_step"]),
        }
        for b in results["per_bin"]
    ]
    note = (
        "Per trained bin (in-bin: the held-out CE change on the validation bins inside the trained bin, so each "
        "probe is scored on different tokens):"
    )
    return note + "\n\n" + markdown_table(rows, list(rows[0]))


def _ratio_lines(results: dict[str, Any]) -> str:
    summary = results["summary"]
    lines = ["Lowest / highest trained bin, every definition:", ""]
    for variant, r in summary["ratio_lowest_to_highest"].items():
        higher = "higher in every seed" if summary["low_mask_advantage"][variant] else "not higher in every seed"
        lines.append(
            f"- {variant} — {EVALUATION.get(variant, '?')}: {_number(r['of_means'])} of the means (per seed: "
            f"{', '.join(_number(x) for x in r['per_seed'])}); lowest bin {higher}."
        )
    return "\n".join(lines)


def _verdict_cell(v: dict[str, Any] | None) -> str:
    if v is None:
        return "–"
    ci = "" if v["ci95"] is None else f" ± {v['ci95']:.2g}"
    more = f", ≈ {v['seeds_needed']} seeds" if v["verdict"] == INCONCLUSIVE and v["seeds_needed"] else ""
    return f"{v['verdict']} ({v['mean']:+.3g}{ci}{more})"


def _same_bin_section(results: dict[str, Any]) -> list[str]:
    same, s = results["same_bin"], results["settings"]
    tokens = {round(b["mask_ratio"][0] * NUM_VAL_BINS): b["tokens"] for b in s["val_bins_before"]}
    low, high = same["per_masked_token"][0], same["per_masked_token"][-1]
    rows = []
    for k, c in enumerate(same["lowest_vs_highest"]):
        verdicts = c["verdicts"] or [None, None]
        rows.append(
            {
                "evaluated r": _bin(c["evaluated_bin"], 1),
                "held-out masked tok": tokens.get(k, 0),
                f"trained {_bin(same['trained_bins'][0])}": _pm(low[k], PER_MILLION),
                f"trained {_bin(same['trained_bins'][-1])}": _pm(high[k], PER_MILLION),
                "ratio of means": _number(c["ratio_of_means"]),
                "≥ 10× (low − 10·high)": _verdict_cell(verdicts[0]),
                "> 1× (low − high)": _verdict_cell(verdicts[1]),
            }
        )
    header = ["trained \\ evaluated r"] + [_bin(b, 1) for b in same["evaluated_bins"]]
    matrix = [
        dict(zip(header, [_bin(t), *(_mean(cell, PER_MILLION) for cell in row)], strict=True))
        for t, row in zip(same["trained_bins"], same["per_masked_token"], strict=True)
    ]
    return [
        "Same evaluated bin: held-out CE change on one realized-mask-ratio bin of V per 1M masked training tokens "
        "(mean ± std over seeds), lowest against highest trained bin, with the verdicts on that bin (paired per "
        "seed, ± 95 % interval, per 1M masked tokens):",
        markdown_table(rows, list(rows[0])),
        "Same-bin matrix: held-out CE change per 1M masked training tokens (mean over seeds), trained × evaluated bin:",
        markdown_table(matrix, header, digits=3),
    ]


def _mean(stat: dict[str, Any] | None, scale: float = 1.0) -> float:
    return math.nan if stat is None or stat["mean"] is None else stat["mean"] * scale


def _ce_section(results: dict[str, Any]) -> list[str]:
    ce = results["ce_change"]
    header = ["trained \\ evaluated r"] + [_bin(b, 1) for b in ce["evaluated_bins"]]
    rows = [
        dict(zip(header, [_bin(t), *(math.nan if v is None else v for v in row)], strict=True))
        for t, row in zip(ce["trained_bins"], ce["delta_ce"], strict=True)
    ]
    return ["Held-out mean masked-token CE, before − after, by realized mask ratio (nats, mean over seeds):",
            markdown_table(rows, header, digits=3)]  # fmt: skip


# ----------------------------------------------------------------------------- plots


def plot_series(results: dict[str, Any]) -> dict[str, Any]:
    """What each plot draws (None: undefined, not drawn)."""
    per_bin, summary, same = results["per_bin"], results["summary"], results["same_bin"]
    high = per_bin[-1]
    ratios = summary["ratio_lowest_to_highest"]
    efficiency = {
        "trained_bin_centres": [sum(b["bin"]) / 2 for b in per_bin],
        "per_masked_token_per_1M": _column(per_bin, "per_masked_token", PER_MILLION),
        "ten_times_highest_per_1M": CLAIM_FACTOR * _mean(high["per_masked_token"], PER_MILLION),
        # the highest bin's progress per step, spread over each bin's masked tokens per step
        "equal_progress_per_1M": [_mean(high["per_step"], PER_MILLION) / b["masked_tokens_per_step"] for b in per_bin],
        "per_step": _column(per_bin, "per_step", 1.0),
        "highest_per_step": _mean(high["per_step"]),
    }
    same_bin = {
        "evaluated_bin_centres": [sum(b) / 2 for b in same["evaluated_bins"]],
        "trained_bins": [_bin(b) for b in same["trained_bins"]],
        "per_masked_token_per_1M": [[_mean(c, PER_MILLION) for c in row] for row in same["per_masked_token"]],
        "ratio_of_means": [c["ratio_of_means"] for c in same["lowest_vs_highest"]],
        "elbo_ratio_of_means": ratios["per_masked_token"]["of_means"],
        "in_bin_ratio_of_means": ratios["in_bin_per_masked_token"]["of_means"],
        "reference_ratios": [1.0, CLAIM_FACTOR],
    }
    ce = results["ce_change"]
    series = {"efficiency": efficiency, "same_bin": same_bin, "ce_change": {k: ce[k] for k in sorted(ce)}}
    return finite(series)


def _column(per_bin: list[dict[str, Any]], key: str, scale: float) -> dict[str, list[float]]:
    return {
        "mean": [_mean(b[key], scale) for b in per_bin],
        "std": [(b[key]["std"] or 0.0) * scale for b in per_bin],
    }


def plot_efficiency(series: dict[str, Any], path: Path) -> Path:
    """Whole held-out ELBO gain per 1M masked training tokens and per step against the trained bin,
    with the comparisons drawn: 10 × the highest bin (the claim), and equal progress per step."""
    plt = pyplot()
    x = series["trained_bin_centres"]
    fig, (tokens, steps) = plt.subplots(1, 2, figsize=(11, 4))
    eff = series["per_masked_token_per_1M"]
    tokens.errorbar(
        x, nan_for_null(eff["mean"]), yerr=eff["std"], fmt="o-", color="C0", capsize=3, label="probes (± std)"
    )
    if series["ten_times_highest_per_1M"] is not None:
        tokens.axhline(series["ten_times_highest_per_1M"], color="C3", ls=":", label="10 × highest bin (the claim)")
    tokens.plot(
        x, nan_for_null(series["equal_progress_per_1M"]), color="grey", ls="--", label="equal progress per step"
    )
    tokens.set_ylabel("ΔELBO per 1M masked training tokens")
    per_step = series["per_step"]
    steps.errorbar(x, nan_for_null(per_step["mean"]), yerr=per_step["std"], fmt="o-", color="C0", capsize=3,
                   label="probes (± std)")  # fmt: skip
    if series["highest_per_step"] is not None:
        steps.axhline(series["highest_per_step"], color="grey", ls="--", label="highest bin (equal progress)")
    steps.set_ylabel("ΔELBO per step")
    for ax in (tokens, steps):
        ax.axhline(0.0, color="black", lw=0.6)
        ax.set_xlabel("trained mask-ratio bin (centre)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("whole held-out ELBO gain (the same evaluation for every probe)", fontsize=10)
    return save_figure(fig, path)


def plot_same_bin(series: dict[str, Any], path: Path) -> Path:
    """Left: ΔCE per 1M masked training tokens on each evaluated bin, one line per trained bin. Right: the
    lowest / highest trained bin ratio on each evaluated bin (log scale; undefined ratios not drawn),
    against 1× and 10×, the whole-ELBO ratio and the in-bin ratio (different evaluations)."""
    plt = pyplot()
    x = series["evaluated_bin_centres"]
    fig, (lines, ratios) = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("viridis")
    n = len(series["trained_bins"])
    for j, (label, row) in enumerate(zip(series["trained_bins"], series["per_masked_token_per_1M"], strict=True)):
        lines.plot(x, nan_for_null(row), "o-", ms=3, color=cmap(j / max(n - 1, 1)), label=f"trained {label}")
    lines.axhline(0.0, color="black", lw=0.6)
    lines.set_ylabel("ΔCE per 1M masked training tokens")
    lines.legend(fontsize=7)
    points = [(c, r) for c, r in zip(x, series["ratio_of_means"], strict=True) if r is not None and r > 0]
    if points:
        ratios.plot(*zip(*points, strict=True), "o", color="C0", label="same evaluated bin")
    for value, style, label in (
        (series["elbo_ratio_of_means"], ("C0", "-"), "whole held-out ELBO"),
        (series["in_bin_ratio_of_means"], ("C1", "-."), "in-bin (own bins: not like-for-like)"),
        (CLAIM_FACTOR, ("C3", ":"), "10× (the claim)"),
        (1.0, ("grey", "--"), "1× (no advantage)"),
    ):
        if value is not None and value > 0:
            ratios.axhline(value, color=style[0], ls=style[1], label=label)
    ratios.set_yscale("log")
    ratios.set_ylabel("lowest / highest trained bin (ratio of means)")
    ratios.legend(fontsize=7)
    for ax in (lines, ratios):
        ax.set_xlabel("evaluated bin: realized mask ratio r (centre)")
        ax.grid(alpha=0.3)
    missing = sum(1 for r in series["ratio_of_means"] if r is None or r <= 0)
    ratios.set_title(f"{missing} evaluated bin(s) undefined or ≤ 0, not drawn" if missing else "", fontsize=8)
    return save_figure(fig, path)


def plot_ce_change(series: dict[str, Any], path: Path) -> Path:
    """Heat map of the held-out per-bin CE change (rows: trained bin, columns: evaluated bin), values written in."""
    import numpy as np

    plt = pyplot()
    data = np.array(_nan_matrix(series["delta_ce"]), dtype=float)
    limit = float(np.nanmax(np.abs(data))) if np.isfinite(data).any() else 1.0
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(data) + 2))
    image = ax.imshow(data, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
    for (i, k), value in np.ndenumerate(data):
        dark = math.isfinite(value) and abs(value) > 0.6 * limit  # white text on the dark end of the map
        text = "–" if math.isnan(value) else f"{value:.3f}"
        ax.text(k, i, text, ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_xticks(range(len(series["evaluated_bins"])), [f"{a:.1f}–{b:.1f}" for a, b in series["evaluated_bins"]])
    ax.set_yticks(range(len(series["trained_bins"])), [_bin(b) for b in series["trained_bins"]])
    ax.set_xlabel("evaluated bin (realized mask ratio r)")
    ax.set_ylabel("trained bin (t)")
    fig.colorbar(image, ax=ax, label="CE before − after (nats; > 0: better)")
    return save_figure(fig, path)


def _nan_matrix(rows: list[list[float | None]]) -> list[list[float]]:
    return [nan_for_null(row) for row in rows]
