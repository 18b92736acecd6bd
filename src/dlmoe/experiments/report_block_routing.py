"""The block-routing report, from the archived results.json alone: verdicts per dMoE claim, the
top-p × guard sweep, the p_train × p_test grid and the plot (unique experts vs ELBO change, agreement).

Claims, judged at dMoE's p = `claim_top_p` and the default guard (both fixed before measuring),
each from paired differences with a 95 % Student-t interval (`dlmoe.experiments.verdicts`):
  (a) block routing uses fewer unique experts per denoising forward than token routing: per prompt,
      block − token (< 0 predicted); training-free, and for the model fine-tuned at p_train = p
      (against the base's token routing: what serving it would replace);
  (b) quality is kept: per held-out batch × noise draw, the ELBO change minus QUALITY_MARGIN of the
      token-routing ELBO (< 0 predicted: the change is within the margin); same two models;
  (c) block-routed fine-tuning beats a token-routed fine-tune of the same steps at p_test = p_train:
      per batch × draw, ELBO(p_train fine-tune) − ELBO(token fine-tune) (< 0 predicted).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from dlmoe.experiments.common import markdown_table
from dlmoe.experiments.controls import control_line
from dlmoe.experiments.plotting import pyplot, save_figure
from dlmoe.experiments.provenance import machine_line
from dlmoe.experiments.raw_data import Rendered, read_raw
from dlmoe.experiments.verdicts import Verdict, verdict

QUALITY_MARGIN = 0.01  # "quality kept": ELBO within 1 % of token routing's (dMoE keeps 99 % of accuracy)


def find(results: dict[str, Any], model: str, top_p: float | None, guard: int | None) -> dict[str, Any] | None:
    """The point of `model` at (top_p, guard); token routing is (None, None)."""
    for p in results["points"]:
        if p["model"] == model and p["top_p"] == top_p and p["guard"] == (None if top_p is None else guard):
            return p
    return None


def grid(results: dict[str, Any]) -> dict[str, Any]:
    """The p_train × p_test table at the default guard: one row per model (training-free base, the
    token-routing fine-tune, each p_train), one cell per p_test (None = token routing)."""
    p_tests = [None, *results["top_ps"]]
    rows = []
    for name, model in results["models"].items():
        cells = []
        for p_test in p_tests:
            pt = find(results, name, p_test, results["guard"])
            keys = ("elbo_change_base", "unique_experts", "agreement_base")
            cells.append({"p_test": p_test} | {k: pt[k] for k in keys})
        rows.append({"model": name, "label": model["label"], "p_train": model["p_train"], "cells": cells})
    return {"guard": results["guard"], "p_test": p_tests, "rows": rows}


def _paired(a: list[float], b: list[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


def _quality(block: dict[str, Any], token: dict[str, Any]) -> list[float]:
    """Per item: ELBO change − QUALITY_MARGIN · |token-routing ELBO| (< 0: within the margin)."""
    return [b - t - QUALITY_MARGIN * abs(t) for b, t in zip(block["elbo_items"], token["elbo_items"], strict=True)]


def verdicts(results: dict[str, Any]) -> list[tuple[str, Verdict, str]]:
    """(key, verdict, unit of its paired differences) per claim whose points were measured."""
    p, g = results["claim_top_p"], results["guard"]
    token = find(results, "base", None, None)
    out = []
    claim_models = [("training-free", "base")] + [
        (f"fine-tuned at p_train={p}", name) for name, m in results["models"].items() if m["p_train"] == p
    ]
    for label, name in claim_models:
        block = find(results, name, p, g)
        if block is None:
            continue
        experts = verdict(
            f"{label} block routing (top-p {p}, guard {g}) uses fewer unique experts per denoising forward "
            "than the base's token routing",
            "unique experts per layer per denoising forward, block − token routing, paired per prompt (< 0 predicted)",
            _paired(block["unique_experts_per_prompt"], token["unique_experts_per_prompt"]),
            predicted_sign=-1,
        )
        quality = verdict(
            f"{label} block routing (top-p {p}, guard {g}) keeps quality: held-out ELBO within "
            f"{100 * QUALITY_MARGIN:g} % of the base's token routing",
            f"ELBO change − {100 * QUALITY_MARGIN:g} % of the token-routing ELBO (nats/token), paired per held-out "
            "batch × noise draw (< 0 predicted)",
            _quality(block, token),
            predicted_sign=-1,
        )
        out += [(f"fewer_experts/{name}", experts, "prompts"), (f"quality/{name}", quality, "batch × draw items")]
    control = "ft_token"
    for name, m in results["models"].items():
        tuned, untuned = find(results, name, m["p_train"], g), find(results, control, m["p_train"], g)
        if m["p_train"] is None or tuned is None or untuned is None:
            continue
        v = verdict(
            f"fine-tuning with block routing (p_train={m['p_train']}) improves the block-routed ELBO over a "
            "token-routed fine-tune of the same steps",
            f"ELBO at p_test={m['p_train']}, guard {g}: block-routed − token-routed fine-tune (nats/token), paired "
            "per held-out batch × noise draw (< 0 predicted)",
            _paired(tuned["elbo_items"], untuned["elbo_items"]),
            predicted_sign=-1,
        )
        out.append((f"finetune/{name}", v, "batch × draw items"))
    return out


def _line(v: Verdict, unit: str) -> str:
    return dataclasses.replace(v, unit=unit).line()


def curves(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The plotted curves: the base per guard, each fine-tune at the default guard; token routing first."""
    out = {}
    for g in results["guards"]:
        token = find(results, "base", None, None)
        out[f"training-free, guard {g}"] = [token] + [find(results, "base", p, g) for p in results["top_ps"]]
    for name, m in results["models"].items():
        if name != "base":
            token = find(results, name, None, None)
            points = [find(results, name, p, results["guard"]) for p in results["top_ps"]]
            out[f"fine-tuned, {m['label']}, guard {results['guard']}"] = [token] + points
    return out


def cheapest(points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The block-routed point with the fewest unique experts whose ELBO is within the margin of the
    same model's token routing (None when none is)."""
    token = points[0]
    within = [p for p in points[1:] if p["elbo_change"] <= QUALITY_MARGIN * abs(token["elbo"])]
    if not within:
        return None
    best = min(within, key=lambda p: (p["unique_experts"], p["top_p"]))
    keys = ("top_p", "guard", "unique_experts", "elbo_change", "agreement")
    return {k: best[k] for k in keys} | {"expert_reduction": token["unique_experts"] / best["unique_experts"]}


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """What the CLI prints: each verdict, and per curve the cheapest top-p within the margin."""
    return {
        "verdicts": {key: v.verdict for key, v, _ in verdicts(results)},
        "cheapest_within_margin": {label: cheapest(points) for label, points in curves(results).items()},
    }


# ----------------------------------------------------------------------------- report


def render(raw_dir: Path) -> Rendered:
    """The report and the plot from the archived results.json and provenance.json alone."""
    results, provenance = read_raw(raw_dir)
    path, series = plot(results, raw_dir / "experts_vs_quality.png")
    return Rendered(report(results, provenance), [path], {"experts_vs_quality": series})


def report(results: dict[str, Any], provenance: dict[str, Any]) -> str:
    o, sc, gen = results["options"], results["options"]["scale_values"], results["generation"]
    base = results["models"]["base"]
    steps = f"{base['steps']} steps" if base["steps"] is not None else f"given run `{results['base_run']}`"
    head = (
        f"Scale: dim {sc['dim']}, {sc['num_layers']} layers, E = {results['num_experts']}, "
        f"k = {results['experts_per_token']}, L = {sc['seq_len']}; token-choice base ({steps}, corpus "
        f"`{o['corpus']}`); fine-tunes: {o['finetune_steps']} steps of masked-token CE (mask ratio in [0.3, 0.8]) "
        f"from the base, block-routed at each p_train or token-routed (the control). Routing blocks of "
        f"{results['block_size']} tokens; default guard {results['guard']}. Generations: {gen['prompts']} "
        f"held-out prefixes of {gen['prompt_length']} tokens, {gen['gen_length']} tokens each in blocks of "
        f"{gen['block_length']}, {gen['steps']} steps, temperature {gen['temperature']:g} (greedy). Unique experts: "
        "distinct routed experts per layer per denoising forward over the decoding block (dMoE's metric). "
        "Agreement: fraction of generated tokens equal to token routing's. ELBO change: held-out validation "
        f"ELBO (nats/token, {results['elbo_items']} batch × noise-draw items on fixed noise) minus token routing's."
    )
    lines = "".join(f"- {_line(v, unit)}\n" for _, v, unit in verdicts(results))
    return (
        f"{head}\n\n{machine_line(provenance)}\n\n{control_line(results)}\n\n"
        f"Claims at dMoE's p = {results['claim_top_p']} (chosen before measuring), guard {results['guard']}:\n\n"
        f"{lines}\n"
        "Training-free, top-p × guard (cells: unique experts · agreement · ELBO change vs token routing):\n\n"
        f"{_sweep_table(results)}\n\n"
        f"p_train × p_test at guard {results['guard']} (cells: ELBO change vs the base's token routing · "
        "unique experts):\n\n"
        f"{_grid_table(results)}\n\n"
        f"Cheapest top-p within {100 * QUALITY_MARGIN:g} % of the same model's token-routing ELBO:\n\n"
        f"{_cheapest_table(results)}" + _mcq_table(results)
    )


def _top_p(value: float | None) -> str:
    return "token routing" if value is None else f"{value:g}"


def _sweep_table(results: dict[str, Any]) -> str:
    columns = ["top-p"] + [f"guard {g}" for g in results["guards"]]
    rows = []
    for top_p in [None, *results["top_ps"]]:
        row = {"top-p": _top_p(top_p)}
        for g in results["guards"]:
            pt = find(results, "base", top_p, g)
            row[f"guard {g}"] = f"{pt['unique_experts']:.2f} · {pt['agreement']:.3f} · {pt['elbo_change']:+.4f}"
        rows.append(row)
    return markdown_table(rows, columns)


def _grid_table(results: dict[str, Any]) -> str:
    table = results["grid"]
    columns = ["p_train \\ p_test"] + [_top_p(p) for p in table["p_test"]]
    rows = []
    for row in table["rows"]:
        cells = {_top_p(c["p_test"]): f"{c['elbo_change_base']:+.4f} · {c['unique_experts']:.2f}" for c in row["cells"]}
        rows.append({"p_train \\ p_test": row["label"]} | cells)
    return markdown_table(rows, columns)


def _cheapest_table(results: dict[str, Any]) -> str:
    rows = []
    for label, points in curves(results).items():
        best = cheapest(points)
        if best is None:
            rows.append({"curve": label, "top-p": "none within the margin"})
            continue
        rows.append({
            "curve": label, "top-p": f"{best['top_p']:g}", "unique experts": f"{best['unique_experts']:.2f}",
            "fewer experts than token routing": f"× {best['expert_reduction']:.2f}",
            "ELBO change": f"{best['elbo_change']:+.4f}", "agreement": f"{best['agreement']:.3f}",
        })  # fmt: skip
    columns = ["curve", "top-p", "unique experts", "fewer experts than token routing", "ELBO change", "agreement"]
    return markdown_table(rows, columns)


def _mcq_table(results: dict[str, Any]) -> str:
    names = list(results["mcq_skipped_lines"])
    if not names:
        return ""

    def accuracy(p: dict[str, Any], name: str) -> str:
        value, interval = p[f"acc_{name}"], p[f"ci95_{name}"]
        if value is None:
            return "–"
        return f"{value:.3f}" + ("" if interval is None else f" [{interval[0]:.3f}, {interval[1]:.3f}]")

    rows = [
        {"model": results["models"][p["model"]]["label"], "top-p": _top_p(p["top_p"]), "guard": p["guard"] or "–"}
        | {name: accuracy(p, name) for name in names}
        for p in results["points"]
    ]
    return "\n\nMultiple-choice accuracy (letter scoring, [95 % Wilson interval]):\n\n" + markdown_table(
        rows, ["model", "top-p", "guard", *names]
    )


def plot(results: dict[str, Any], path: Path) -> tuple[Path, dict[str, Any]]:
    """Unique experts (x) vs ELBO change and vs agreement with the base's token routing (y), one
    curve per guard (training-free) and per fine-tune; ★ = token routing. Returns the series drawn."""
    plt = pyplot()

    mcq = list(results["mcq_skipped_lines"])
    fig, axes = plt.subplots(1, 2 + len(mcq), figsize=(6 * (2 + len(mcq)), 4.5), squeeze=False)
    ys = ["elbo_change_base", "agreement_base"] + [f"acc_{name}" for name in mcq]
    series: dict[str, Any] = {}
    for i, (label, points) in enumerate(curves(results).items()):
        data = {"top_p": [p["top_p"] for p in points], "unique_experts": [p["unique_experts"] for p in points]}
        data |= {y: [p.get(y) for p in points] for y in ys}
        series[label] = data
        for ax, y in zip(axes[0], ys, strict=True):
            values = [math.nan if v is None else v for v in data[y]]
            ax.plot(data["unique_experts"][1:], values[1:], "o-", color=f"C{i}", ms=3, label=label)
            ax.plot(data["unique_experts"][0], values[0], "*", color=f"C{i}", markersize=12)
    titles = ["ELBO − base token-routing ELBO (nats/token)", "agreement with base token-routing generation"]
    for ax, title in zip(axes[0], titles + [f"{name} accuracy (letter scoring)" for name in mcq], strict=True):
        ax.set(xlabel="unique experts per layer per denoising forward", ylabel=title)
        ax.grid(alpha=0.3)
    axes[0][0].axhline(0.0, color="black", lw=0.8)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path, dpi=110)
    return path, series
