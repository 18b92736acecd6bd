"""`dlmoe experiment NAME --option KEY=VALUE`: experiment-specific options reach ExperimentArgs.extra."""

import pytest

from dlmoe.cli import main
from dlmoe.cli_experiments import parse_options


def test_values_parse_as_yaml():
    parsed = parse_options(["guard=8", "ranges=[[1,4],[2,3]]", "schedules=[linear]", "top=0.5", "flag=true", "s=abc"])
    assert parsed == {"guard": 8, "ranges": [[1, 4], [2, 3]], "schedules": ["linear"], "top": 0.5, "flag": True,
                      "s": "abc"}  # fmt: skip


@pytest.mark.parametrize("item", ["guard", "=3", "a b=1", "1x=2"])
def test_malformed_option_refused(item):
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        parse_options([item])


def test_unknown_option_refused_by_the_experiment_before_writing(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["experiment", "block-routing", "--out", str(out), "--option", "gaurd=8"])
    assert code != 0 and not out.exists()
    assert "gaurd" in capsys.readouterr().err
