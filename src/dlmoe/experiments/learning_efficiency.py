"""`dlmoe experiment learning-efficiency`: how much held-out ELBO a training token buys, per mask-ratio bin.

EC-DLM explains why more expert capacity should go to low-mask-ratio steps: "tokens in low-mask-
ratio contexts exhibit an order-of-magnitude higher learning efficiency". No code exists upstream;
this is our precise version (docs/learning_efficiency.md):

  1. one base checkpoint (--base-run, or an expert-choice run trained here: 1200 steps at the laptop
     preset, where its routed experts matter), with its routed-experts-off control;
  2. per bin [lo, hi) and replicate seed: a copy fine-tuned for N steps with the training noise
     t ~ U[lo, hi), constant LR (the base's lr × min_lr_ratio), loss = mean CE over masked tokens;
  3. every probe is scored on the SAME held-out set V with the same masks: the whole ELBO and the CE
     in each of the 10 realized-mask-ratio bins. The headline efficiency is ΔELBO / masked training
     tokens; the lowest and highest bins are compared on the same evaluation, per seed, and the
     claims get computed verdicts (`claim_verdicts`). The same-bin matrix (trained × evaluated bin,
     ΔCE per masked training token) repeats the comparison on each evaluated bin. The older "in-bin"
     variants score each probe on its own bins, so their ratio compares different evaluations; they
     are kept, and reported as such.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import statistics
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
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
from dlmoe.experiments.common import Scale, check_args, finite, prepare_output, seed_stats
from dlmoe.experiments.provenance import finish_record, start_record
from dlmoe.experiments.raw_data import Rendered, publish, read_raw
from dlmoe.experiments.verdicts import Verdict, verdict
from dlmoe.train.init_from import SourceRun

NAME = "learning-efficiency"
BASE_VARIANT = {"model.moe.router.kind": "expert_choice"}  # EC-DLM's model
DEFAULT_BINS = 5
LOSS_WEIGHTING = "masked_mean"  # every loss-bearing token weighs the same: "per masked token" is literal
VARIANTS = ("per_masked_token", "per_step", "per_token", "in_bin_per_masked_token", "in_bin_per_step")
HEADLINE = "per_masked_token"  # ΔELBO on the whole held-out set per masked training token: one evaluation for all
CLAIM_FACTOR = 10.0  # "an order of magnitude"
PER_MILLION = 1e6  # verdict differences in nats per 1M masked training tokens (readable numbers)
EXTRA_KEYS = ("num_bins",)
# laptop: the base trains 1200 steps (its routed experts were worth 0.00 nats at 300 steps, 0.43 at 1200:
# bench/routed_control.py) and V holds 32 batches (512 rows, of 758), so that the few masked tokens of the
# low-mask-ratio validation bins number in the hundreds
LAPTOP_BASE = {"steps": 1200, "eval_every": 100, "eval_batches": 32}
PROBE_FRACTION = 6  # default probe steps = base steps / 6: 200 at the laptop preset (the 45-min budget)


def default_steps(base_steps: int) -> int:
    """Fine-tuning steps per probe when --steps is not given: a sixth of the base's training steps."""
    return max(1, base_steps // PROBE_FRACTION)


def base_scale(args: ExperimentArgs) -> Scale:
    """The scale the base trains at (and the probes' batch and V): the preset, with `LAPTOP_BASE` on laptop."""
    scale = args.scale
    return dataclasses.replace(scale, **LAPTOP_BASE) if args.scale_name == "laptop" else scale


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
    when the validation set has no token there. Each probe is scored on its own bins: compare these
    across bins only with that in mind (`same_bin` compares on common bins)."""
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
    """low / high; NaN (undefined) unless the highest bin improved (high > 0)."""
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


# ----------------------------------------------------------------------------- run


def _check(args: ExperimentArgs) -> tuple[Scale, int, int]:
    """(base scale, fine-tuning steps, number of bins); every option checked before anything is written."""
    check_args(args, EXTRA_KEYS)
    scale = base_scale(args)
    steps = default_steps(scale.steps) if args.steps is None else args.steps
    num_bins = args.extra.get("num_bins", DEFAULT_BINS)
    mask_ratio_bins(num_bins)
    if args.base_run is not None:
        SourceRun.open(args.base_run, name="--base-run")  # a bad path fails before --out is touched
    return scale, steps, num_bins


def planned_steps(args: ExperimentArgs) -> dict[str, int]:
    """Optimizer steps `run(args)` will train (dlmoe.experiments.suite); checks the options too. The
    suite's default overhead fits: one evaluation of V and a trainer set-up per probe, ≈ 10–15 %."""
    scale, steps, num_bins = _check(args)
    return ({} if args.base_run else {"base": scale.steps}) | {"probes": num_bins * args.seeds * steps}


def run(args: ExperimentArgs) -> dict:
    """Train (or open) the base, fine-tune one probe per mask-ratio bin and seed (`args.jobs` at once);
    write results.json, provenance.json, plots and results.md into args.out."""
    from dlmoe.experiments.controls import routed_experts_control

    scale, steps, num_bins = _check(args)
    options = {"scale": args.scale_name, "corpus": args.corpus, "seeds": args.seeds, "steps": steps}
    options |= {"num_bins": num_bins, "base_run": args.base_run, "scaling_factor": args.scaling_factor}
    out = prepare_output(args.out, NAME, options, overwrite=args.overwrite)
    record, started = start_record(scale.device, args.jobs), time.perf_counter()
    source, trained = base_run(args.base_run, out, scale, args.corpus, BASE_VARIANT, scaling_factor=args.scaling_factor)
    control = routed_experts_control(source.path) | {"seed": source.config.train.seed}
    lr = source.config.train.lr * source.config.train.min_lr_ratio
    shared = probe_overrides(scale, steps, lr, eval_every=steps) | {"train.loss_weighting": LOSS_WEIGHTING}
    bins = mask_ratio_bins(num_bins)
    probes, before = run_probes(out, source, shared, bins, args.seeds, args.jobs)
    settings = {
        "base_run": str(source.path),
        "base_trained_here": trained,
        "base_router": source.config.model.moe.router.kind if source.config.model.moe else "dense",
        "base_steps": source.config.train.steps,
        "steps": steps,
        "lr": lr,
        "lr_schedule": "constant",
        "loss_weighting": LOSS_WEIGHTING,
        "batch_size": scale.batch_size,
        "seq_len": source.config.data.seq_len,
        "eval_rows": before["rows"],
        "seeds": list(range(args.seeds)),
        "elbo_before": before["val_loss"],
        "val_bins_before": before["bins"],
    }
    results = summarize(probes, bins, settings) | {"controls": {"base": [control]}}
    safe = finite(results)
    publish(out, args.report_name(NAME), safe, finish_record(record, started), args.results_doc)
    return safe


def run_probes(
    out: Path, source: SourceRun, shared: dict[str, Any], bins: Sequence[tuple[float, float]], seeds: int, jobs: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(probe records replicate-major, θ₀'s {"val_loss", "bins", "rows" of V}). The first probe runs alone and also
    measures the start, which is the same for every probe (same weights, V and validation noise); the
    others run `jobs` at once in spawned processes (results do not depend on `jobs`)."""
    specs = [
        (
            out / "runs" / f"bin{lo:.2f}-{hi:.2f}_seed{r}",
            shared | {"train.mask_ratio_min": lo, "train.mask_ratio_max": hi},
            r,
        )
        for r in range(seeds)
        for lo, hi in bins
    ]
    trainer = ProbeTrainer(probe_config(source, *specs[0][:2]), specs[0][2])
    rows = sum(int(batch.shape[0]) for batch in trainer.data.validation_batches)  # V: what the split holds
    first = run_probe(trainer, measure_before=True)
    assert first.before is not None
    done = [first, *_map_probes(source.path, specs[1:], jobs)]
    bounds = [b for _ in range(seeds) for b in bins]
    records = [_probe_record(r, b, first.before, out) for r, b in zip(done, bounds, strict=True)]
    return records, first.before | {"rows": rows}


def _map_probes(source_path: Path, specs: list[tuple[Path, dict[str, Any], int]], jobs: int) -> list[ProbeResult]:
    if jobs == 1 or len(specs) < 2:
        return [_probe_job(source_path, *spec) for spec in specs]
    from dlmoe.experiments.jobs import threads_per_job

    threads = threads_per_job(jobs)
    context = multiprocessing.get_context("spawn")  # no forked torch thread pools
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = [pool.submit(_probe_job, source_path, d, o | {"train.threads": threads}, r) for d, o, r in specs]
        return [future.result() for future in futures]


def _probe_job(source_path: Path, run_dir: Path, overrides: dict[str, Any], replicate: int) -> ProbeResult:
    """One probe, in this process or a worker (top level: spawned workers import it)."""
    source = SourceRun.open(source_path)
    return run_probe(ProbeTrainer(probe_config(source, run_dir, overrides), replicate), measure_before=False)


def render(raw_dir: Path) -> Rendered:
    """The report, plots and plotted series from the archived results.json and provenance.json alone."""
    from dlmoe.experiments.report_learning_efficiency import render_report

    results, provenance = read_raw(raw_dir)
    # the derived figures and verdicts are recomputed from the archived per-seed probes by this code
    bins = [tuple(b["bin"]) for b in results["per_bin"]]
    probes = [{k: nan_for_null(v) for k, v in probe.items()} for probe in results["probes"]]  # JSON null was NaN
    derived = summarize(probes, bins, results["settings"])
    results = results | {key: derived[key] for key in ("per_bin", "ce_change", "same_bin", "summary")}
    return render_report(results, provenance, raw_dir)


def nan_for_null(value: Any) -> Any:
    """results.json's null (`finite` wrote NaN so) back to NaN, in lists too."""
    if value is None:
        return math.nan
    return [nan_for_null(v) for v in value] if isinstance(value, list) else value


def _probe_record(result: ProbeResult, bounds: tuple[float, float], before: dict[str, Any], out: Path) -> dict:
    eff = efficiency(
        before["val_loss"], result.after["val_loss"], masked_tokens=result.masked_tokens, tokens=result.tokens,
        steps=result.steps,
    )  # fmt: skip
    eff |= in_bin_efficiency(
        before["bins"], result.after["bins"], bounds, masked_tokens=result.masked_tokens, steps=result.steps
    )
    return {
        "bin": list(bounds),
        "seed": result.replicate,
        "run_dir": str(result.run_dir.relative_to(out)),
        "elbo_after": result.after["val_loss"],
        "masked_tokens": result.masked_tokens,
        "tokens": result.tokens,
        "steps": result.steps,
        "t_drawn": result.t_drawn,
        "mean_mask_ratio": result.mean_mask_ratio,
        "train_s": result.rows[-1]["train_s"] if result.rows else math.nan,
        "delta_ce": ce_change(before["bins"], result.after["bins"]),
    } | eff


# ----------------------------------------------------------------------------- summary


def _by_seed(probes: Sequence[dict], bin_: Sequence[float], key: str) -> list[Any]:
    """`key` of the probes of `bin_`, in seed order."""
    runs = sorted((p for p in probes if p["bin"] == list(bin_)), key=lambda p: p["seed"])
    return [p[key] for p in runs]


def claim_verdicts(low: Sequence[float], high: Sequence[float], evaluation: str) -> list[Verdict]:
    """EC-DLM's claim and its weaker form, from per-seed efficiencies (per masked training token) of the
    lowest and highest trained bin on the SAME `evaluation`. The paired difference per seed is
    low − f·high (f = 1) and low − f·max(high, 0) (f = 10), per 1M masked tokens, predicted > 0: > 0
    exactly when low/high > f; where the highest bin did not improve at all the order-of-magnitude
    claim holds iff the lowest bin did (a ratio over a loss is no "10× more efficient": with
    low − 10·high two losses would count as a win)."""
    out = []
    for factor, claim in (
        (CLAIM_FACTOR, "tokens in low-mask-ratio contexts learn an order of magnitude (≥ 10×) more efficiently"),
        (1.0, "tokens in low-mask-ratio contexts learn more efficiently (the weaker claim)"),
    ):
        high_term = "highest bin" if factor == 1 else f"{factor:g} × max(highest bin, 0)"
        measure = f"{evaluation} per 1M masked training tokens, lowest bin − {high_term} (> 0 predicted)"
        floor = -math.inf if factor == 1 else 0.0
        diffs = [PER_MILLION * (a - factor * max(b, floor)) for a, b in zip(low, high, strict=True)]
        out.append(verdict(claim, measure, diffs))
    return out


def _stats(values: Sequence[float]) -> dict[str, Any] | None:
    """seed_stats, or None where any seed has no number (an evaluated bin without held-out tokens)."""
    return seed_stats(values) if values and all(math.isfinite(v) for v in values) else None


def same_bin(probes: Sequence[dict], bins: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Trained bin × evaluated bin: ΔCE on that evaluated bin of V per masked training token (stats over
    seeds), and per evaluated bin the lowest-vs-highest trained bin comparison on that same bin."""
    per_seed = {}  # trained bin → [seed][evaluated bin] ΔCE / M
    for b in bins:
        changes, masked = _by_seed(probes, b, "delta_ce"), _by_seed(probes, b, "masked_tokens")
        per_seed[b] = [[math.nan if c is None else c / m for c in row] for row, m in zip(changes, masked, strict=True)]
    matrix = [[_stats([row[k] for row in per_seed[b]]) for k in range(NUM_VAL_BINS)] for b in bins]
    comparisons = []
    for k, evaluated in enumerate(_val_bins()):
        low, high = ([row[k] for row in per_seed[b]] for b in (bins[0], bins[-1]))
        defined = all(math.isfinite(v) for v in low + high)
        comparisons.append(
            {
                "evaluated_bin": evaluated,
                "ratio_of_means": ratio(statistics.fmean(low), statistics.fmean(high)) if defined else math.nan,
                "ratio_per_seed": [ratio(a, b) for a, b in zip(low, high, strict=True)],
                "verdicts": [
                    v.as_dict()
                    for v in claim_verdicts(low, high, f"ΔCE on r ∈ [{evaluated[0]:.1f}, {evaluated[1]:.1f})")
                ]
                if defined
                else [],
            }
        )
    return {"trained_bins": [list(b) for b in bins], "evaluated_bins": _val_bins(), "per_masked_token": matrix,
            "lowest_vs_highest": comparisons}  # fmt: skip


def summarize(probes: list[dict], bins: list[tuple[float, float]], settings: dict) -> dict[str, Any]:
    """Per-bin spread over seeds, lowest/highest-bin ratios and verdicts, the same-bin comparison, and
    the trained × evaluated ΔCE matrix."""
    per_bin, matrix = [], []
    for b in bins:
        runs = [p for p in probes if p["bin"] == list(b)]
        stats = {key: seed_stats([p[key] for p in runs]) for key in ("delta_elbo", "delta_ce_in_bin", *VARIANTS)}
        masked_per_step = statistics.fmean(p["masked_tokens"] / p["steps"] for p in runs)
        per_bin.append({"bin": list(b), "masked_tokens_per_step": masked_per_step} | stats)
        columns = zip(*(p["delta_ce"] for p in runs), strict=True)
        matrix.append([statistics.fmean(c) if all(map(math.isfinite, c)) else math.nan for c in columns])
    low, high = per_bin[0], per_bin[-1]
    ratios, advantage = {}, {}
    for v in VARIANTS:
        lows, highs = _by_seed(probes, low["bin"], v), _by_seed(probes, high["bin"], v)
        per_seed = [ratio(a, b) for a, b in zip(lows, highs, strict=True)]
        ratios[v] = {"of_means": ratio(low[v]["mean"], high[v]["mean"]), "per_seed": per_seed}
        advantage[v] = all(a > b for a, b in zip(lows, highs, strict=True))
    headline = claim_verdicts(
        _by_seed(probes, low["bin"], HEADLINE), _by_seed(probes, high["bin"], HEADLINE), "held-out ELBO gain"
    )
    summary = {
        "lowest_bin": low["bin"],
        "highest_bin": high["bin"],
        "headline": HEADLINE,
        "verdicts": [v.as_dict() for v in headline],
        "ratio_lowest_to_highest": ratios,
        "low_mask_advantage": advantage,
        # the per-masked-token ratio that equal progress per step would give: it only counts tokens
        "equal_progress_ratio": high["masked_tokens_per_step"] / low["masked_tokens_per_step"],
        "paper_claim": "an order of magnitude (about 10x) higher learning efficiency at low mask ratio",
    }
    ce = {"trained_bins": [list(b) for b in bins], "evaluated_bins": _val_bins(), "delta_ce": matrix}
    return {"experiment": NAME, "settings": settings, "probes": probes, "per_bin": per_bin, "ce_change": ce,
            "same_bin": same_bin(probes, bins), "summary": summary}  # fmt: skip


def _val_bins() -> list[list[float]]:
    return [[i / NUM_VAL_BINS, (i + 1) / NUM_VAL_BINS] for i in range(NUM_VAL_BINS)]
