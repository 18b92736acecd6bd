"""Multiple-choice questions from a local jsonl file, one object per line:

    {"question": str, "choices": [str, ...], "answer": 2 | "C", "subject": str (optional)}

`answer` is the 0-based index of the correct choice or its letter (A, B, …, either case). A line
that is not such an object (bad JSON, missing field, empty choice, answer out of range, more than
26 choices) is skipped and counted, never fatal: one bad line must not end a long run. Blank
lines are ignored.
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass, field
from pathlib import Path

from dlmoe._checks import check_int

LETTERS = string.ascii_uppercase  # choice labels; 26 at most
MAX_PROBLEMS = 5  # skipped lines described in `McqData.problems`


@dataclass(frozen=True)
class McqItem:
    """One question; `answer` is the index of the correct choice."""

    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str | None = None
    line: int = 0  # 1-based line number in its file


@dataclass
class McqData:
    """The valid items of a file (up to `limit`), and how many lines were skipped and why."""

    path: str
    items: list[McqItem] = field(default_factory=list)
    skipped: int = 0
    problems: list[str] = field(default_factory=list)  # the first few skipped lines: "line 7: reason"

    def skip(self, line: int, reason: str) -> None:
        self.skipped += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(f"line {line}: {reason}")


def read_mcq_jsonl(path: str | Path, *, limit: int | None = None) -> McqData:
    """Parse a jsonl file of questions; stop after `limit` valid items. A missing or unreadable
    file is a ValueError (before any work starts); bad lines are skipped and counted."""
    if limit is not None:
        check_int("limit", limit, low=1)
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"multiple-choice file {str(file)!r} does not exist or is not a file")
    data = McqData(str(file))
    with file.open(encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if limit is not None and len(data.items) >= limit:
                break
            if not line.strip():
                continue
            try:
                data.items.append(parse_item(json.loads(line), number))
            except (json.JSONDecodeError, ValueError) as err:
                data.skip(number, str(err).splitlines()[0][:200])
    return data


def parse_item(record: object, line: int = 0) -> McqItem:
    """One validated item from a decoded json line; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a json object, got {type(record).__name__}")
    question, choices, answer = record.get("question"), record.get("choices"), record.get("answer")
    if not isinstance(question, str) or not question.strip():
        raise ValueError("'question' must be a non-empty string")
    if not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"'choices' must be a list of 2..{len(LETTERS)} strings")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise ValueError("every choice must be a non-empty string")
    subject = record.get("subject")
    subject = subject if isinstance(subject, str) else None
    return McqItem(question, tuple(choices), answer_index(answer, len(choices)), subject, line)


def answer_index(answer: object, num_choices: int) -> int:
    """The 0-based index of `answer`, given as an index or a letter."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        index = answer
    elif isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        index = LETTERS.index(answer.strip().upper())
    else:
        raise ValueError(f"'answer' must be a choice index or a letter A-Z, got {answer!r}")
    if not 0 <= index < num_choices:
        raise ValueError(f"'answer' {answer!r} is out of range for {num_choices} choices")
    return index
