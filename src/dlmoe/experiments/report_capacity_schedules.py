"""capacity-schedules' report: verdicts on EC-DLM's schedule claims, tables and plots, from results.json alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dlmoe.experiments.common import format_delta, format_stats, markdown_table
from dlmoe.experiments.controls import control_line
from dlmoe.experiments.plotting import pyplot, save_figure
from dlmoe.experiments.provenance import machine_line
from dlmoe.experiments.verdicts import Verdict, verdict

STATIC = "constant"  # the static-k baseline (capacity_schedules.STATIC)

# EC-DLM: more capacity at low mask ratio wins at matched FLOPs; a schedule's predicted sign of
# (its final loss − static's): −1 where it gives low mask ratios more capacity, +1 where less
PREDICTED_SIGN = {"linear_reverse": -1, "cosine_reverse": -1, "linear": 1, "cosine": 1}


def verdicts(results: dict[str, Any]) -> list[Verdict]:
    """One verdict per schedule whose sign EC-DLM's claim predicts, from the paired per-seed Δ; with a
    screen, also "linear_reverse is the best" against the screen's best other schedule."""
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
    screen = results.get("screen")
    if screen and "linear_reverse" in results["schedules"] and screen["best_other"] in results["schedules"]:
        best = screen["best_other"]
        pairs = zip(results["schedules"][best]["runs"], results["schedules"]["linear_reverse"]["runs"], strict=True)
        out.append(
            verdict(
                f"linear_reverse consistently achieves the best performance under matched FLOPs (vs {best}, "
                "the screen's best other schedule, on fresh seeds)",
                f"{best} final loss − linear_reverse final loss (> 0 predicted)",
                [b["final_val_loss"] - lr["final_val_loss"] for b, lr in pairs],
            )
        )
    return out


def screen_text(results: dict[str, Any]) -> str:
    """The screen's table (one seed per schedule) and what it chose, or nothing without a screen."""
    screen = results.get("screen")
    if not screen:
        return ""
    static = screen["final_val_loss"][STATIC]
    rows = [
        {"screen rank": i, "schedule": name, "final val loss (seed 0)": f"{screen['final_val_loss'][name]:.4f}",
         "Δ vs static": f"{screen['final_val_loss'][name] - static:+.4f}"}
        for i, name in enumerate(screen["ranking"], 1)
    ]  # fmt: skip
    return (
        f"Screen (seed 0, every FLOPs-matched schedule once): the best schedule other than static and "
        f"linear_reverse is **{screen['best_other']}**; the headline below compares static, linear_reverse and "
        "it on fresh seeds (the screen's seed is not reused, so choosing the best does not bias its Δ).\n\n"
        f"{markdown_table(rows, list(rows[0]))}\n\n"
    )


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
        + ("\n" + screen_text(results) if results.get("screen") else "")
        + f"\n{markdown_table(rows, list(rows[0]))}\n\n"
        "Validation CE on masked tokens per mask-ratio bin (last evaluation): static, and each schedule's Δ:\n\n"
        f"{markdown_table(bin_rows, columns)}"
    )


def plot_bins(results: dict[str, Any], path: Path) -> tuple[Path, dict[str, Any]]:
    """Per-mask-ratio-bin CE of every schedule, and its paired difference to static (± seed std);
    returns the series drawn."""
    plt = pyplot()
    series: dict[str, Any] = {}
    fig, (absolute, delta) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, s) in enumerate(results["schedules"].items()):
        centres = [sum(b["mask_ratio"]) / 2 for b in s["bins"]]
        style = {"color": f"C{i}", "marker": "o", "ms": 3, "label": name}  # one colour per schedule in both panels
        ce = [b["ce"]["mean"] for b in s["bins"]]
        absolute.plot(centres, ce, **style)
        series[name] = {"colour": style["color"], "mask_ratio": centres, "ce": ce}
        if name == STATIC:
            delta.axhline(0.0, color=style["color"], lw=1.0, label=f"{name} (reference)")
        else:
            mean = [b["vs_static"]["mean"] for b in s["bins"]]
            std = [b["vs_static"]["std"] or 0.0 for b in s["bins"]]
            delta.errorbar(centres, mean, yerr=std, capsize=2, alpha=0.85, **style)
            series[name] |= {"delta": mean, "delta_std": std}
    absolute.set_ylabel("masked-token CE (nats)")
    delta.set_ylabel("CE − static CE (± seed std)")
    for ax in (absolute, delta):
        ax.set_xlabel("mask ratio r (bin centre)")
        ax.grid(alpha=0.3)
    absolute.legend(fontsize=8)
    save_figure(fig, path)
    return path, series


def plot_final(results: dict[str, Any], path: Path) -> tuple[Path, dict[str, Any]]:
    """Final validation loss per schedule (± seed std), and the paired difference to static (± 95 % interval)."""
    plt = pyplot()
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
    save_figure(fig, path)
    series = {"schedules": names, "final_val_loss": [s["mean"] for s in stats],
              "vs_static": [d["mean"] if d else 0.0 for d in diffs]}  # fmt: skip
    return path, series
