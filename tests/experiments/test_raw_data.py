"""docs/results.md is rendered only from committed raw data: verdicts, provenance and the renderer.

The last test re-renders every experiment archived under docs/results/*/ and asserts the committed
sections of docs/results.md (tables, verdicts, links) and the plotted series are reproduced exactly.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from dlmoe.experiments.common import rotated, t95
from dlmoe.experiments.provenance import git_state, load_average, machine_line
from dlmoe.experiments.raw_data import (
    DOC_HEADER,
    SERIES,
    committed_sections,
    raw_folders,
    render_experiment,
    section,
)
from dlmoe.experiments.verdicts import CONTRADICTED, INCONCLUSIVE, REPRODUCED, seeds_needed, verdict

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "results.md"


def test_verdicts_follow_the_interval_and_the_predicted_sign():
    assert verdict("c", "m", [0.10, 0.12, 0.11, 0.09, 0.13]).verdict == REPRODUCED
    assert verdict("c", "m", [-0.10, -0.12, -0.11, -0.09, -0.13]).verdict == CONTRADICTED
    assert verdict("c", "m", [-0.10, -0.12, -0.11], predicted_sign=-1).verdict == REPRODUCED
    mixed = verdict("c", "m", [0.1, -0.05, 0.08, -0.02, 0.04])
    assert mixed.verdict == INCONCLUSIVE and mixed.seeds == 5
    assert mixed.seeds_needed is not None and mixed.seeds_needed > 5
    assert "seeds would resolve" in mixed.line()
    assert verdict("c", "m", [0.3]).verdict == INCONCLUSIVE  # one seed: no interval
    with pytest.raises(ValueError, match="predicted_sign"):
        verdict("c", "m", [1.0, 2.0], predicted_sign=0)
    with pytest.raises(ValueError, match="no finite paired difference"):
        verdict("c", "m", [math.nan])


def test_seeds_needed_is_the_first_n_whose_interval_excludes_zero():
    mean, std = 0.05, 0.1
    n = seeds_needed(mean, std)
    assert t95(n - 1) * std / math.sqrt(n) < mean <= t95(n - 2) * std / math.sqrt(n - 1)
    assert seeds_needed(0.0, 0.1) is None and seeds_needed(1.0, None) is None


def test_rotated_order_puts_each_variant_first_once_per_cycle():
    names = ["a", "b", "c"]
    firsts = [rotated(names, seed)[0] for seed in range(3)]
    assert sorted(firsts) == names and sorted(rotated(names, 7)) == names


def test_provenance_pieces():
    state = git_state(ROOT)
    assert state["commit"] is None or len(state["commit"]) == 40
    load = load_average()
    assert load["cores"] >= 1
    record = {"cpu": "X", "threads": 2, "dtype": "fp32", "torch": "2", "git": {"commit": "a" * 40},
              "load_before": {"1m": 3.0, "cores": 2, "busy": True}, "load_after": {"1m": 0.1, "cores": 2}}  # fmt: skip
    line = machine_line(record)
    assert "not idle" in line and "aaaaaaaaaa" in line


def _archived() -> list[Path]:
    return raw_folders(DOC) if DOC.is_file() else []


def test_every_section_of_the_doc_has_its_raw_data():
    if not DOC.is_file():
        pytest.skip("no docs/results.md in this checkout")
    text = DOC.read_text()
    assert text.startswith(DOC_HEADER)
    assert sorted(committed_sections(DOC)) == sorted(p.name for p in _archived())
    assert not sorted((DOC.parent / "results").glob("*.png")), "a figure outside an experiment's raw folder"


@pytest.mark.parametrize("raw", _archived(), ids=lambda p: p.name)
def test_the_committed_section_is_what_the_raw_data_renders(raw: Path, tmp_path: Path):
    docs = tmp_path / "docs"
    copy = docs / "results" / raw.name
    shutil.copytree(raw, copy)
    rendered = render_experiment(copy)  # writes plots and plots.json into the copy, not the repo
    assert section(raw.name, rendered, docs / "results.md") == committed_sections(DOC)[raw.name]
    assert json.loads((copy / SERIES).read_text()) == json.loads((raw / SERIES).read_text())


def test_results_documents_do_not_make_the_checkout_dirty(tmp_path: Path):
    """A suite's earlier experiments rewrite docs/results*: a later one's code is still the commit's."""
    import subprocess

    def git(*args: str) -> None:
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                       capture_output=True)  # fmt: skip

    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results.md").write_text("# Results\n")
    (tmp_path / "docs" / "results" / "a.json").write_text("{}")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "init")
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "docs" / "results.md").write_text("# Results\n\nnew section\n")
    (tmp_path / "docs" / "results" / "a.json").write_text('{"new": 1}')
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path)["dirty"] is True
