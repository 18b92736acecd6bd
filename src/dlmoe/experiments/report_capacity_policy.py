"""capacity-policy's comparisons at equal FLOPs, verdicts, tables and plots — from results.json alone.

Equal FLOPs. The static points k = 1 … k_max, sorted by measured FLOPs per generated token, form the
baseline frontier. A schedule point with FLOPs F between static neighbours F_i ≤ F ≤ F_j is compared
with (1 − w)·q_i + w·q_j, w = (F − F_i)/(F_j − F_i), prompt by prompt. That interpolation is itself
a policy at the same average FLOPs — static k_i on a fraction 1 − w of the prompts, k_j on w — so the
paired per-prompt difference is a fair "same compute" comparison; a point outside the frontier gets
none. Every row of a generation runs the same steps, hence the same FLOPs, so one w serves all prompts.
The proxy (validation ELBO) is compared the same way against its own static frontier.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dlmoe.experiments.common import format_delta, markdown_table, seed_stats
from dlmoe.experiments.controls import control_line
from dlmoe.experiments.plotting import pyplot, save_figure
from dlmoe.experiments.provenance import machine_line
from dlmoe.experiments.verdicts import Verdict, verdict

# the sign each schedule predicts for (its generative NLL − static's at equal FLOPs), carried over from
# EC-DLM's training result (more capacity at low mask ratio wins): −1 where late steps (low still-masked
# fraction) get more experts, +1 where they get fewer
PREDICTED_SIGN = {"linear_reverse": -1, "cosine_reverse": -1, "linear": 1, "cosine": 1}
MEASURES = ("nll", "agreement", "distinct")


def interpolation(frontier: Sequence[float], flops: float) -> tuple[int, int, float] | None:
    """(i, j, w) with frontier[i] ≤ flops ≤ frontier[j] neighbours (frontier ascending) and flops =
    (1 − w)·frontier[i] + w·frontier[j]; None outside [frontier[0], frontier[-1]]."""
    tolerance = 1e-9 * max(abs(f) for f in frontier)
    if not frontier[0] - tolerance <= flops <= frontier[-1] + tolerance:
        return None
    for i in range(len(frontier) - 1):
        low, high = frontier[i], frontier[i + 1]
        if flops <= high + tolerance:
            w = 0.0 if high == low else min(max((flops - low) / (high - low), 0.0), 1.0)
            return i, i + 1, w
    return len(frontier) - 1, len(frontier) - 1, 0.0  # a frontier of one point


def _statics(base: dict[str, Any]) -> list[dict[str, Any]]:
    return sorted((p for p in base["points"] if p["static"]), key=lambda p: p["flops_per_token"])


def paired(base: dict[str, Any], point: dict[str, Any]) -> dict[str, Any] | None:
    """Per-prompt differences of `point` to the static frontier of `base` at its FLOPs (None outside)."""
    statics = _statics(base)
    at = interpolation([s["flops_per_token"] for s in statics], point["flops_per_token"])
    if at is None:
        return None
    i, j, w = at
    out: dict[str, Any] = {"bracket": [statics[i]["k_min"], statics[j]["k_min"]], "weight": w}
    for key in MEASURES:
        low, high = statics[i][key], statics[j][key]
        out[key] = [v - _between(a, b, w) for v, a, b in zip(point[key], low, high, strict=True)]
    proxies = sorted((s["proxy"] for s in statics), key=lambda p: p["flops_per_token"])
    at = interpolation([p["flops_per_token"] for p in proxies], point["proxy"]["flops_per_token"])
    out["proxy"] = None
    if at is not None:
        i, j, w = at
        out["proxy"] = point["proxy"]["elbo"] - _between(proxies[i]["elbo"], proxies[j]["elbo"], w)
    return out


def _between(a: float, b: float, w: float) -> float:
    """(1 − w)·a + w·b, exactly a where a = b (no rounding residue posing as an effect)."""
    return a + w * (b - a)


def comparisons(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Every schedule point against static at equal FLOPs, pooled over bases × prompts (the proxy: over bases)."""
    out = []
    for point in results["bases"][0]["points"]:
        if point["static"]:
            continue
        name = point["setting"]
        per_base = [paired(b, next(p for p in b["points"] if p["setting"] == name)) for b in results["bases"]]
        row: dict[str, Any] = {
            "setting": name,
            "schedule": point["schedule"],
            "k_range": [point["k_min"], point["k_max"]],
        }
        if any(p is None for p in per_base):
            out.append(row | {"interpolable": False})
            continue
        row |= {
            "interpolable": True,
            "brackets": [p["bracket"] for p in per_base],
            "weights": [p["weight"] for p in per_base],
        }
        for key in MEASURES:
            row[key] = seed_stats([v for p in per_base for v in p[key]])
        proxies = [p["proxy"] for p in per_base if p["proxy"] is not None]
        row["proxy"] = seed_stats(proxies) if proxies else None
        out.append(row)
    return out


def verdicts(results: dict[str, Any]) -> list[tuple[Verdict, dict[str, Any]]]:
    """(verdict, comparison) for each schedule point whose sign the carried-over claim predicts."""
    out = []
    for comp in comparisons(results):
        sign = PREDICTED_SIGN.get(comp["schedule"])
        if sign is None or not comp["interpolable"]:
            continue
        claim = (
            f"{comp['setting']} ({'more' if sign < 0 else 'fewer'} experts late in denoising) gives "
            f"{'lower' if sign < 0 else 'higher'} generative NLL than static k at equal FLOPs"
        )
        measure = f"per-prompt Δ generative NLL vs interpolated static ({'< 0' if sign < 0 else '> 0'} predicted)"
        out.append((verdict(claim, measure, comp["nll"]["values"], predicted_sign=sign), comp))
    return out


def less_diverse(comp: dict[str, Any]) -> bool:
    """The point's distinct-token fraction is lower than static's at equal FLOPs (95 % interval below 0)."""
    d = comp["distinct"]
    return d["ci95"] is not None and d["mean"] + d["ci95"] < 0


def verdict_line(v: Verdict, comp: dict[str, Any]) -> str:
    """The verdict's line (the paired unit is a prompt of a base), with a warning where the point's
    text is less diverse than static's at equal FLOPs."""
    text = dataclasses.replace(v, unit="prompts").line()
    if less_diverse(comp):
        diversity = format_delta(comp["distinct"])
        text += f"; its text is also less diverse (Δ distinct {diversity}): part of the NLL gain is repetition"
    return text


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """What the CLI prints: Δ generative NLL per schedule point and each verdict."""
    comps = comparisons(results)
    return {
        "delta_nll": {c["setting"]: c["nll"]["mean"] for c in comps if c["interpolable"]},
        "verdicts": {comp["setting"]: v.verdict for v, comp in verdicts(results)},
    }


# ----------------------------------------------------------------------------- tables


def point_means(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per setting: FLOPs and experts per token (mean over bases), the measures pooled over bases × prompts."""
    out = []
    for point in results["bases"][0]["points"]:
        same = [next(p for p in b["points"] if p["setting"] == point["setting"]) for b in results["bases"]]
        row = {key: point[key] for key in ("setting", "schedule", "k_min", "k_max", "static")}
        for key in ("flops_per_token", "experts_per_token"):
            row[key] = statistics.fmean(p[key] for p in same)
        for key in MEASURES:
            row[key] = statistics.fmean(v for p in same for v in p[key])
        for key in ("elbo", "flops_per_token", "experts_per_token"):
            row[f"proxy_{key}"] = statistics.fmean(p["proxy"][key] for p in same)
        out.append(row)
    return out


def _table(results: dict[str, Any]) -> str:
    comps = {c["setting"]: c for c in comparisons(results)}
    rows = []
    for p in point_means(results):
        c = comps.get(p["setting"], {})
        interp = c.get("interpolable")
        rows.append({
            "setting": p["setting"], "MFLOPs/token": p["flops_per_token"] / 1e6,
            "experts/token": p["experts_per_token"], "gen NLL": p["nll"], "agreement": p["agreement"],
            "distinct": p["distinct"], "proxy ELBO": p["proxy_elbo"],
            "proxy experts/token": p["proxy_experts_per_token"],
            "Δ gen NLL": format_delta(c["nll"]) if interp else "–",
            "Δ agreement": format_delta(c["agreement"]) if interp else "–",
            "Δ distinct": format_delta(c["distinct"]) if interp else "–",
            "Δ proxy ELBO": format_delta(c["proxy"]) if interp else "–",
        })  # fmt: skip
    return markdown_table(rows, list(rows[0]))


def report(results: dict[str, Any], provenance: dict[str, Any]) -> str:
    s, bases = results["sweep"], results["bases"]
    m, o = bases[0]["model"], results["options"]
    origin = f"trained here for {m['train_steps']} steps, seeds {[b['seed'] for b in bases]}"
    origin = origin if bases[0]["trained_here"] else f"`{bases[0]['run_dir']}` (--base-run)"
    pairs = len(bases) * s["prompts"]
    head = (
        f"Base: expert-choice model ({origin}; corpus `{o['corpus']}`): dim {m['dim']}, {m['num_layers']} layers, "
        f"E = {m['num_experts']}, k = {m['k']}, {m['shared_experts']} shared expert(s). "
        f"Sampling: {s['prompts']} prompts (the first {s['prompt_length']} tokens of held-out validation rows), "
        f"greedy, {s['gen_length']} tokens in "
        f"blocks of {s['block_length']}, {s['denoising_steps']} steps, no cache, {s['dtype']}. A schedule point uses "
        "k_b = k_min + (k_max − k_min)·s(r_b), r_b the still-masked fraction of the row's generation. "
        f"Generative NLL: MC-ELBO of the generated continuation ({s['mc_num']} masks per prompt, the same for every "
        f"setting) under the same model at static k = {s['reference_k']}, nats/token, lower is better (the judge "
        "favours text like its own: static k_max judges itself). Agreement: fraction of positions equal to the "
        "static-k_max generation. Distinct: distinct tokens / generated tokens (repetition lowers the NLL). Proxy: "
        "held-out validation ELBO with each row's k from the policy at its mask ratio. FLOPs: active matmul FLOPs "
        "per generated token, as the sampler measured them over every forward. Δ: the point minus the static "
        f"frontier interpolated at its FLOPs, paired per prompt; mean ± 95 % interval over {pairs} (base, prompt) "
        "pairs (the proxy: over bases)."
    )
    heldout_nll = statistics.fmean(v for b in bases for v in b["heldout"]["nll"])
    heldout_distinct = statistics.fmean(v for b in bases for v in b["heldout"]["distinct"])
    heldout = (
        f"The held-out continuation of the same prompts (real text) scores generative NLL {heldout_nll:.4g}, "
        f"distinct {heldout_distinct:.3g}: generations far below that NLL are more predictable than real text."
    )
    found = verdicts(results)
    lines = "".join(f"- {verdict_line(v, comp)}\n" for v, comp in found)
    chance = f"{len(found)} verdicts at 95 % each: about {0.05 * len(found):.2g} may fall outside 0 by chance alone.\n"
    return (
        f"{head}\n\n{machine_line(provenance)}\n\n{control_line(results)}\n\n{heldout} {judge_check(results)}\n\n"
        f"{lines}{chance if found else ''}\n{_table(results)}"
    )


def judge_check(results: dict[str, Any]) -> str:
    """Whether the judge (static k_max) is the model's best static setting by the held-out ELBO (the proxy)."""
    static = [p for p in point_means(results) if p["static"]]
    best = min(static, key=lambda p: p["proxy_elbo"])
    k_max = results["sweep"]["reference_k"]
    at_k_max = next(p["proxy_elbo"] for p in static if p["k_min"] == k_max)
    outcome = "the judge is the best static setting" if best["k_min"] == k_max else "the judge is not the best one"
    return (
        f"Judge check: the held-out validation ELBO of static k is lowest at k = {best['k_min']} "
        f"({best['proxy_elbo']:.4g} nats/token; at k_max = {k_max}: {at_k_max:.4g}) — {outcome}."
    )


# ----------------------------------------------------------------------------- plots


def curve_series(results: dict[str, Any]) -> dict[str, Any]:
    """The data `plot_curve` draws: the static frontier, each schedule point, the held-out NLL."""
    means = point_means(results)
    keys = ("flops_per_token", "nll", "agreement", "distinct", "proxy_flops_per_token", "proxy_elbo")
    static = [p for p in means if p["static"]]
    schedules: dict[str, Any] = {}
    for p in means:
        if not p["static"]:
            schedules.setdefault(p["schedule"], {"k_range": []} | {k: [] for k in keys})
            schedules[p["schedule"]]["k_range"].append([p["k_min"], p["k_max"]])
            for k in keys:
                schedules[p["schedule"]][k].append(p[k])
    heldout = statistics.fmean(v for b in results["bases"] for v in b["heldout"]["nll"])
    return {"static": {"k": [p["k_min"] for p in static]} | {k: [p[k] for p in static] for k in keys},
            "schedules": schedules, "heldout_nll": heldout}  # fmt: skip


def plot_curve(results: dict[str, Any], path: Path) -> tuple[Path, dict[str, Any]]:
    """Generative NLL, agreement (vs FLOPs per generated token) and the proxy ELBO (vs its FLOPs)."""
    from matplotlib.ticker import MaxNLocator

    plt, series = pyplot(), curve_series(results)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (("flops_per_token", "nll", "generative NLL (nats/token, judge: static k_max)"),
              ("flops_per_token", "agreement", "token agreement with static k_max"),
              ("proxy_flops_per_token", "proxy_elbo", "proxy: validation ELBO (nats/token)"))  # fmt: skip
    markers = "osD^vP*X"
    for ax, (x, y, label) in zip(axes, panels, strict=True):
        st = series["static"]
        ax.plot([f / 1e6 for f in st[x]], st[y], "k-o", label="static k (frontier)")
        for k, fx, fy in zip(st["k"], st[x], st[y], strict=True):
            ax.annotate(f"k={k}", (fx / 1e6, fy), textcoords="offset points", xytext=(4, 4), fontsize=7)
        for i, (name, s) in enumerate(series["schedules"].items()):
            xs = [f / 1e6 for f in s[x]]
            ax.scatter(xs, s[y], marker=markers[i % len(markers)], color=f"C{i}", label=name, zorder=3)
        if y == "nll":
            ax.axhline(series["heldout_nll"], color="grey", ls="--", lw=0.8, label="held-out continuation")
        ax.set_xlabel("active MFLOPs per generated token" if x == "flops_per_token" else "MFLOPs per token (proxy)")
        ax.set_ylabel(label)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    save_figure(fig, path)
    return path, series


def plot_deltas(results: dict[str, Any], path: Path) -> tuple[Path, dict[str, Any]]:
    """Each schedule point minus static at equal FLOPs (± 95 % interval): generative NLL and distinct fraction."""
    plt = pyplot()
    comps = [c for c in comparisons(results) if c["interpolable"]]
    series = {c["setting"]: {key: [c[key]["mean"], c[key]["ci95"]] for key in ("nll", "distinct")} for c in comps}
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(comps) + 2), sharey=True)
    y = list(range(len(comps)))
    labels = ("Δ generative NLL (nats/token)", "Δ distinct fraction")
    for ax, key, label in zip(axes, ("nll", "distinct"), labels, strict=True):
        means = [series[c["setting"]][key][0] for c in comps]
        errors = [series[c["setting"]][key][1] or 0.0 for c in comps]
        ax.errorbar(means, y, xerr=errors, fmt="o", capsize=3)
        ax.axvline(0.0, color="black", lw=0.8)
        ax.set_xlabel(f"{label} vs static at equal FLOPs (± 95 %)")
        ax.grid(alpha=0.3)
    axes[0].set_yticks(y, [c["setting"] for c in comps], fontsize=8)
    axes[0].invert_yaxis()  # the table's order, top down
    save_figure(fig, path)
    return path, series
