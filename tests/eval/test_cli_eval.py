"""`dlmoe eval` end to end on a tiny trained run: JSON lines, --out, skipped lines, clear errors."""

import argparse
import json
import sys
from pathlib import Path

import pytest

from dlmoe.cli_eval import add_eval_parser

BENCHMARKS = Path(__file__).resolve().parents[3] / "shared" / "data" / "benchmarks"


def main(argv: list[str]) -> int:
    """`dlmoe eval …` as cli.main runs it (ValueError → exit 2), whether or not cli.py registers it yet."""
    parser = argparse.ArgumentParser(prog="dlmoe")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as err:
        print(f"dlmoe: error: {err}", file=sys.stderr)
        return 2
    return 0


def evaluate(capsys, run_dir: Path, *args: str) -> tuple[int, list[dict], str]:
    code = main(["eval", "--run", str(run_dir), "--no-progress", *args])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


@pytest.fixture
def mcq_file(tmp_path: Path) -> Path:
    lines = [
        json.dumps({"question": "The king speaks of", "choices": ["stars and seas", "a dog"], "answer": 0}),
        json.dumps({"question": "The queen answers with", "choices": ["a song", "roses", "seas"], "answer": "B"}),
        "{broken",
        "",
        json.dumps({"question": "Scene", "choices": ["1.", "The king"], "answer": 7}),
        json.dumps({"question": "Who speaks?", "choices": ["the king", "the queen"], "answer": "a"}),
    ]
    path = tmp_path / "tiny.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_mcq_both_methods_with_limit_and_out(capsys, trained_run, mcq_file, tmp_path) -> None:
    out = tmp_path / "results.json"
    args = ["--mcq", str(mcq_file), "--method", "both", "--mc-num", "2", "--limit", "2", "--out", str(out)]
    code, lines, err = evaluate(capsys, trained_run, *args)
    assert code == 0, err
    assert [(line["eval"], line["method"]) for line in lines] == [("mcq", "elbo"), ("mcq", "letter")]
    for line in lines:
        assert line["n"] == 2 and line["skipped_lines"] == 0 and line["skipped"] == 0  # limit: lines 1-2 only
        assert 0 <= line["ci95"][0] <= line["accuracy"] <= line["ci95"][1] <= 1
        assert line["chance"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert "accuracy_norm" in lines[0] and lines[0]["mc_num"] == 2 and lines[1]["letter_token"] in (" A", "A")
    saved = json.loads(out.read_text())["results"]
    assert [r["method"] for r in saved] == ["elbo", "letter"] and saved[0]["accuracy"] == lines[0]["accuracy"]
    # an existing --out is refused before any work, unless --overwrite
    code, lines, err = evaluate(capsys, trained_run, *args)
    assert code == 2 and lines == [] and "already exists; pass --overwrite" in err
    code, lines, err = evaluate(capsys, trained_run, *args, "--overwrite")
    assert code == 0 and len(lines) == 2


def test_bad_lines_are_counted_not_fatal(capsys, trained_run, mcq_file) -> None:
    code, lines, err = evaluate(capsys, trained_run, "--mcq", str(mcq_file), "--method", "letter")
    assert code == 0, err
    [line] = lines
    assert line["n"] == 3 and line["skipped_lines"] == 2
    assert [p.split(":")[0] for p in line["problems"]] == ["line 3", "line 5"]


def test_text_and_validation(capsys, trained_run, tmp_path) -> None:
    text = tmp_path / "held_out.txt"
    text.write_text("The queen answers with 5 roses and a song. The king speaks of stars.\n" * 4)
    code, lines, err = evaluate(capsys, trained_run, "--text", str(text), "--validation", "--mc-num", "2")
    assert code == 0, err
    validation, bound = lines
    assert validation["eval"] == "validation" and validation["bits_per_byte"] > 0
    assert bound["eval"] == "text" and bound["file"] == str(text) and bound["chunks"] == -(-bound["tokens"] // 32)
    assert bound["bits_per_byte"] == pytest.approx(
        bound["nelbo_nats_per_token"] * bound["tokens"] / bound["bytes"] / 0.6931471805599453, rel=1e-4
    )


def test_no_file_means_validation(capsys, trained_run) -> None:
    code, lines, err = evaluate(capsys, trained_run)
    assert code == 0, err
    assert [line["eval"] for line in lines] == ["validation"]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--mc-num", "0"], "--mc-num must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--seq-len", "0"], "--seq-len must be >= 1"),
        (["--text", "missing.txt"], "--text 'missing.txt' does not exist"),
        (["--mcq", "missing.jsonl"], "'missing.jsonl' does not exist"),
        (["--out", "/nonexistent-folder/r.json"], "does not exist"),
    ],
)
def test_bad_input_is_one_clear_error(capsys, trained_run, args, match) -> None:
    code, lines, err = evaluate(capsys, trained_run, *args)
    assert code == 2 and lines == [] and match in err, err


def test_bad_run_and_method(capsys, tmp_path) -> None:
    code, _, err = evaluate(capsys, tmp_path)
    assert code == 2 and "no trained model" in err
    with pytest.raises(SystemExit):
        main(["eval", "--run", str(tmp_path), "--method", "mmlu"])


def test_shared_benchmark_runs(capsys, trained_run) -> None:
    arc = BENCHMARKS / "arc_easy_test.jsonl"
    if not arc.is_file():
        pytest.skip("shared benchmark files not available")
    code, lines, err = evaluate(
        capsys, trained_run, "--mcq", str(arc), "--method", "both", "--limit", "3", "--mc-num", "1"
    )
    assert code == 0, err
    assert [line["n"] for line in lines] == [3, 3] and all(line["skipped"] == 0 for line in lines)


def test_registered_in_the_dlmoe_cli(capsys, trained_run, mcq_file) -> None:
    from dlmoe import cli

    with pytest.raises(SystemExit) as help_exit:
        cli.build_parser().parse_args(["eval", "--help"])
    capsys.readouterr()
    if help_exit.value.code != 0:
        pytest.skip("dlmoe.cli does not register `eval` yet")
    code = cli.main(["eval", "--run", str(trained_run), "--no-progress", "--mcq", str(mcq_file), "--method", "letter"])
    assert code == 0 and json.loads(capsys.readouterr().out)["n"] == 3
