"""Reading multiple-choice jsonl: index or letter answers, bad lines skipped and counted, limit."""

import json
from pathlib import Path

import pytest

from dlmoe.eval import read_mcq_jsonl
from dlmoe.eval.mcq_file import answer_index

BENCHMARKS = Path(__file__).resolve().parents[3] / "shared" / "data" / "benchmarks"


def write_lines(path: Path, lines: list[object]) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


GOOD = {"question": "Which?", "choices": ["x", "y", "z"], "answer": 2, "subject": "s"}


def test_index_and_letter_answers_and_skipped_lines(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "q.jsonl",
        [
            GOOD,
            {"question": "Letter?", "choices": ["a", "b"], "answer": "B"},
            {"question": "lower", "choices": ["a", "b"], "answer": " a "},
            "",  # blank: ignored, not counted
            "{not json",
            {"question": "range", "choices": ["a", "b"], "answer": 2},
            {"question": "letter range", "choices": ["a", "b"], "answer": "C"},
            {"question": "bool", "choices": ["a", "b"], "answer": True},
            {"question": "digit string", "choices": ["a", "b"], "answer": "1"},
            {"question": "one choice", "choices": ["a"], "answer": 0},
            {"question": "empty choice", "choices": ["a", " "], "answer": 0},
            {"question": "", "choices": ["a", "b"], "answer": 0},
            {"choices": ["a", "b"], "answer": 0},
            [1, 2],
        ],
    )
    data = read_mcq_jsonl(path)
    assert [item.answer for item in data.items] == [2, 1, 0]
    assert [item.line for item in data.items] == [1, 2, 3]
    assert data.items[0].subject == "s" and data.items[1].subject is None
    assert data.skipped == 10
    assert len(data.problems) == 5 and data.problems[0].startswith("line 5:")
    assert "out of range" in data.problems[1]


def test_limit_counts_valid_items(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "q.jsonl", ["bad", GOOD, "bad", GOOD, GOOD])
    data = read_mcq_jsonl(path, limit=2)
    assert len(data.items) == 2 and data.skipped == 2


@pytest.mark.parametrize(("answer", "n", "index"), [(0, 4, 0), (3, 4, 3), ("A", 2, 0), ("d", 4, 3)])
def test_answer_index(answer, n, index) -> None:
    assert answer_index(answer, n) == index


def test_missing_file_and_bad_limit_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        read_mcq_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="limit must be >= 1"):
        read_mcq_jsonl(write_lines(tmp_path / "q.jsonl", [GOOD]), limit=0)


def test_shared_benchmark_files_parse_with_integer_answers() -> None:
    files = sorted(BENCHMARKS.glob("*.jsonl")) if BENCHMARKS.is_dir() else []
    if not files:
        pytest.skip("shared benchmark files not available")
    for file in files:
        data = read_mcq_jsonl(file, limit=50)
        assert len(data.items) == 50 and data.skipped == 0, (file, data.problems)
