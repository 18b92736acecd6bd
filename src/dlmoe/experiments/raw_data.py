"""An experiment's raw data under `docs/results/<name>/`, and its report rendered only from there.

    docs/results/<name>/
        provenance.json                  commit + dirty flag, command line, torch, dtype, CPU/GPU,
                                         threads, load average before/after (`provenance.py`)
        results.json                     the aggregated numbers (what the experiment computed)
        runs/<variant>/seed<N>/          metrics.csv, val_bins.json, config.json of every run
        *.png, plots.json                the plots, and the data series each one draws

`render_experiment` reads only these files, so docs/results.md is a function of committed data
and committed code: `dlmoe experiment render` regenerates every section, and a test asserts the
committed sections are exactly what the renderer writes. The experiment modules provide
`render(raw_dir) -> Rendered`; their `run` archives the raw data and then renders from it too.
"""

from __future__ import annotations

import importlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlmoe._fs import atomic_write_text, staged_folder
from dlmoe.experiments.common import VariantRun, metrics_rows, write_json

RUN_FILES = ("metrics.csv", "val_bins.json", "config.json")
RESULTS, PROVENANCE, SERIES = "results.json", "provenance.json", "plots.json"
DOC_HEADER = (
    "# Results\n\n"
    "Rendered by `dlmoe render-results` from the raw data committed under `docs/results/<experiment>/` "
    "(per-run metrics, configs, aggregated results and a provenance record); do not edit by hand.\n"
)


@dataclass(frozen=True)
class Rendered:
    """An experiment's report: markdown, the plot files (inside the raw folder) and their data series."""

    markdown: str
    plots: list[Path]
    series: dict[str, Any] = field(default_factory=dict)


def archive_raw(out: Path, raw_dir: Path, results: dict[str, Any], provenance: dict[str, Any]) -> None:
    """Copy the raw files of every run under `out/runs` (any folder holding a metrics.csv, at its
    relative path) into `raw_dir`, with results.json and provenance.json; `raw_dir` is replaced as
    a whole, atomically."""
    with staged_folder(raw_dir, replace=True) as scratch:
        for metrics in sorted((out / "runs").rglob("metrics.csv")):
            run_dir = metrics.parent
            target = scratch / run_dir.relative_to(out)
            target.mkdir(parents=True)
            for name in RUN_FILES:
                if (run_dir / name).is_file():
                    shutil.copyfile(run_dir / name, target / name)
        write_json(scratch / RESULTS, results)
        write_json(scratch / PROVENANCE, provenance)


def publish(
    out: Path, report_name: str, results: dict[str, Any], provenance: dict[str, Any], results_doc: str | None
) -> Rendered:
    """Write results.json and provenance.json into `out`; with `results_doc`, archive the raw data
    under `<doc dir>/results/<report_name>/` and render the doc's section from that archive. The
    report (`out/results.md` too) is always rendered from raw files, never from memory."""
    write_json(out / RESULTS, results)
    write_json(out / PROVENANCE, provenance)
    raw_dir = out
    if results_doc is not None:
        raw_dir = Path(results_doc).parent / "results" / report_name
        archive_raw(out, raw_dir, results, provenance)
    rendered = render_experiment(raw_dir)
    links = "\n".join(f"![{p.stem}]({p.relative_to(raw_dir).as_posix()})" for p in rendered.plots)
    atomic_write_text(out / "results.md", f"## {report_name}\n\n{rendered.markdown}\n\n{links}\n")
    if results_doc is not None:
        render_doc(Path(results_doc), only=[report_name])
    return rendered


def read_raw(raw_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(results, provenance) of an archived experiment."""
    from dlmoe.config_io import read_json

    what = "an experiment's raw data; regenerate it with `dlmoe experiment NAME --results-doc docs/results.md`"
    return read_json(raw_dir / RESULTS, what), read_json(raw_dir / PROVENANCE, what)


def load_variant_runs(raw_dir: Path) -> dict[str, list[VariantRun]]:
    """Every archived run, by variant, in seed order (metrics.csv and val_bins.json)."""
    runs: dict[str, list[VariantRun]] = {}
    for run_dir in sorted((raw_dir / "runs").glob("*/seed*"), key=lambda p: (p.parent.name, _seed(p))):
        bins = json.loads((run_dir / "val_bins.json").read_text())["bins"]
        run = VariantRun(run_dir.parent.name, _seed(run_dir), run_dir, metrics_rows(run_dir), bins)
        runs.setdefault(run.name, []).append(run)
    return runs


def _seed(run_dir: Path) -> int:
    return int(run_dir.name.removeprefix("seed"))


def render_experiment(raw_dir: Path) -> Rendered:
    """The report of the experiment archived in `raw_dir`, by that experiment's own `render`."""
    from dlmoe.experiments import EXPERIMENTS

    results, _ = read_raw(raw_dir)
    name = results.get("experiment")
    if name not in EXPERIMENTS:
        raise ValueError(f"{raw_dir / RESULTS} names experiment {name!r}; known: {sorted(EXPERIMENTS)}")
    module = importlib.import_module(EXPERIMENTS[name])
    if not hasattr(module, "render"):
        raise ValueError(f"experiment {name!r} cannot render from raw data yet (no render function)")
    rendered = module.render(raw_dir)
    write_json(raw_dir / SERIES, rendered.series)
    return rendered


def section(report_name: str, rendered: Rendered, doc: Path) -> str:
    """The doc section of one experiment, plots linked relative to `doc`."""
    links = [f"![{p.stem}]({p.relative_to(doc.parent).as_posix()})" for p in rendered.plots]
    begin, end = f"<!-- experiment:{report_name} -->", f"<!-- /experiment:{report_name} -->"
    return f"{begin}\n## {report_name}\n\n{rendered.markdown}\n\n" + "\n".join(links) + f"\n{end}"


def raw_folders(doc: Path) -> list[Path]:
    """The archived experiments beside `doc` (`<doc dir>/results/*/results.json`), by name."""
    return sorted(p.parent for p in (doc.parent / "results").glob(f"*/{RESULTS}"))


def render_doc(doc: Path, only: Sequence[str] = ()) -> list[str]:
    """Rewrite `doc` from every archived experiment (or just `only`, keeping the other sections as
    they are); returns the report names rendered. Sections without raw data are dropped."""
    doc = Path(doc)
    folders = raw_folders(doc)
    names = [p.name for p in folders]
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise ValueError(f"no raw data for {unknown} under {doc.parent / 'results'}; archived: {names}")
    old = _sections(doc.read_text()) if doc.is_file() else {}
    sections = {}
    for folder in folders:
        if only and folder.name not in only and folder.name in old:
            sections[folder.name] = old[folder.name]
        else:
            sections[folder.name] = section(folder.name, render_experiment(folder), doc)
    atomic_write_text(doc, DOC_HEADER + _awaiting(names) + "".join(f"\n{text}\n" for text in sections.values()))
    return [n for n in names if not only or n in only]


def _awaiting(names: Sequence[str]) -> str:
    """The registry's experiments that have no archived raw data yet (generated, never hand-kept)."""
    from dlmoe.experiments import EXPERIMENTS

    missing = [name for name in EXPERIMENTS if name not in names]
    if not missing:
        return ""
    listed = ", ".join(f"`{name}`" for name in missing)
    return (
        f"\nNo committed raw data yet for {listed}: run `dlmoe experiment NAME --results-doc docs/results.md` "
        "(sections rendered before raw data was archived were removed: their numbers could not be traced).\n"
    )


def _sections(text: str) -> dict[str, str]:
    """The `<!-- experiment:NAME -->` … `<!-- /experiment:NAME -->` sections of a doc, by name."""
    out = {}
    for chunk in text.split("<!-- experiment:")[1:]:
        name = chunk.split(" -->", 1)[0]
        end = f"<!-- /experiment:{name} -->"
        if end in chunk:
            out[name] = "<!-- experiment:" + chunk.split(end, 1)[0] + end
    return out


def committed_sections(doc: Path) -> dict[str, str]:
    """The experiment sections of `doc` as committed (for the reproduction test)."""
    return _sections(Path(doc).read_text())
