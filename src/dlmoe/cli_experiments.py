"""`dlmoe experiment NAME`, `dlmoe retrofit` and `dlmoe render-results`: the papers' claims as commands
(see dlmoe.experiments) and the results document rendered from their committed raw data."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dlmoe._checks import check_int


def add_experiment_parsers(sub: argparse._SubParsersAction) -> None:
    from dlmoe.experiments import EXPERIMENTS, SCALES

    p = sub.add_parser("experiment", help="reproduce a paper claim: results JSON, plots and a markdown table")
    p.add_argument("name", choices=sorted(EXPERIMENTS))
    _common(p, SCALES)
    p.add_argument(
        "--base-run", dest="base_run", help="a finished run to start from (learning-efficiency, block-routing)"
    )
    p.add_argument("--mcq", nargs="*", default=[], help="multiple-choice jsonl files for quality (block-routing)")
    p.add_argument("--allow-unmatched", dest="allow_unmatched", action="store_true",
                   help="capacity-schedules: run schedules whose expected FLOPs differ by more than 1%%")  # fmt: skip
    p.add_argument("--option", dest="options", action="append", default=[], metavar="KEY=VALUE",
                   help="an experiment-specific option (YAML value; e.g. guard=8 for block-routing, "
                        "prompts=16 for capacity-policy, num_bins=4 for learning-efficiency); repeatable")  # fmt: skip
    p.add_argument("--no-tune", dest="no_tune", action="store_true",
                   help="ec-vs-tc: keep EC-DLM's balancing strengths instead of tuning them on seed 0")  # fmt: skip
    p.set_defaults(func=experiment)

    p = sub.add_parser("retrofit", help="swap a token-choice run's router to expert choice, fine-tune, compare")
    p.add_argument("--from", dest="base_run", required=True, help="the token-choice run to retrofit")
    _common(p, SCALES)
    p.add_argument("--reinit-router", dest="reinit_router", action="store_true", help="re-initialise router weights")
    p.set_defaults(func=retrofit, name="retrofit")

    p = sub.add_parser(
        "results",
        help="run the results suite behind docs/results.md (prints the expected time first; --plan: only that)",
    )
    p.add_argument("--only", nargs="*", default=[], help="only these suite experiments")
    p.add_argument("--plan", action="store_true", help="print the planned steps and expected time, run nothing")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="skip the timing calibration (steps only, no minutes)")  # fmt: skip
    p.add_argument("--jobs", type=int, default=1, help="training runs at once (see dlmoe experiment --jobs)")
    p.add_argument("--out", default="runs/results", help="where the runs go (one folder per experiment)")
    p.add_argument("--doc", default="docs/results.md", help="the results document its sections go to")
    p.set_defaults(func=results_suite)

    p = sub.add_parser(
        "render-results",
        help="re-render docs/results.md (sections and plots) from the raw data committed under docs/results/*/",
    )
    p.add_argument("names", nargs="*", help="only these experiments' sections (default: all with raw data)")
    p.add_argument("--doc", default="docs/results.md", help="the results document (default: docs/results.md)")
    p.set_defaults(func=render_results)


def _common(p: argparse.ArgumentParser, scales: dict) -> None:
    p.add_argument("--out", required=True, help="output folder (refused if it holds another run, unless --overwrite)")
    p.add_argument("--scale", dest="scale_name", choices=sorted(scales), default="laptop")
    p.add_argument("--corpus", default="shakespeare")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, help="training steps per variant (default: the scale's)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument(
        "--jobs", type=int, default=1,
        help="training runs at once, each with cores/JOBS threads (results unchanged; wall-clock figures share cores)",
    )  # fmt: skip
    p.add_argument(
        "--no-scaling-factor",
        dest="no_scaling_factor",
        action="store_true",
        help="ablation: train without EC-DLM's routed-gate scaling factor (on by default, as in its scripts)",
    )
    p.add_argument(
        "--results-doc", dest="results_doc", help="also regenerate this experiment's section of e.g. docs/results.md"
    )


def _args(ns: argparse.Namespace, **extra: object):
    from dlmoe.experiments import ExperimentArgs

    check_int("--seeds", ns.seeds, low=1)
    check_int("--jobs", ns.jobs, low=1)
    if ns.steps is not None:
        check_int("--steps", ns.steps, low=1)
    return ExperimentArgs(
        out=Path(ns.out),
        scale_name=ns.scale_name,
        corpus=ns.corpus,
        seeds=ns.seeds,
        steps=ns.steps,
        overwrite=ns.overwrite,
        results_doc=ns.results_doc,
        allow_unmatched=getattr(ns, "allow_unmatched", False),
        base_run=ns.base_run,
        mcq=tuple(getattr(ns, "mcq", ())),
        extra=dict(extra),
        scaling_factor=not ns.no_scaling_factor,
        jobs=ns.jobs,
    )


def parse_options(items: list[str]) -> dict[str, object]:
    """`KEY=VALUE` pairs → {key: YAML-parsed value}; the experiment refuses keys it does not know."""
    from omegaconf import OmegaConf

    options: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ValueError(f"--option {item!r}: expected KEY=VALUE with KEY an identifier (e.g. guard=8)")
        options[key] = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={value}"]))[key]
    return options


def experiment(ns: argparse.Namespace) -> None:
    from dlmoe.experiments import experiment_runner

    extra = parse_options(ns.options) | ({"tune": False} if ns.no_tune else {})
    results = experiment_runner(ns.name)(_args(ns, **extra))
    print(json.dumps({"experiment": ns.name, "out": str(ns.out), "summary": results.get("summary", {})}))


def retrofit(ns: argparse.Namespace) -> None:
    from dlmoe.experiments import experiment_runner

    results = experiment_runner("retrofit")(_args(ns, reinit_router=ns.reinit_router))
    print(json.dumps({"experiment": "retrofit", "out": str(ns.out), "summary": results.get("summary", {})}))


def results_suite(ns: argparse.Namespace) -> None:
    from dlmoe.experiments import experiment_runner
    from dlmoe.experiments.jobs import check_jobs
    from dlmoe.experiments.suite import plan, plan_lines, seconds_per_step, suite_args

    check_jobs(ns.jobs)
    entries = suite_args(Path(ns.out), ns.doc, ns.jobs, ns.only)
    step_s = seconds_per_step(ns.jobs) if ns.calibrate else None
    plans = [plan(name, args, step_s) for name, args in entries]
    print("\n".join(plan_lines(plans, step_s, ns.jobs)), flush=True)
    if ns.plan:
        return
    for (name, args), planned in zip(entries, plans, strict=True):
        started = time.perf_counter()
        experiment_runner(name)(args)
        expected = "" if planned.minutes is None else f" (expected ≈ {planned.minutes:.0f})"
        print(f"{name}: {(time.perf_counter() - started) / 60:.1f} min{expected}", flush=True)


def render_results(ns: argparse.Namespace) -> None:
    from dlmoe.experiments.raw_data import render_doc

    rendered = render_doc(Path(ns.doc), only=ns.names)
    print(json.dumps({"doc": ns.doc, "rendered": rendered}))
