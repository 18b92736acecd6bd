"""Tiny corpora and one small tokenizer shared by the data tests."""

from pathlib import Path

import pytest

from dlmoe.data import train_tokenizer

SAMPLE_DOCUMENTS = [
    "Now, fair Hippolyta, our nuptial hour\nDraws on apace; four happy days bring in\nAnother moon.\n",
    "Four days will quickly steep themselves in night;\nFour nights will quickly dream away the time.\n",
    "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))  # 3\n",
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
]


@pytest.fixture(scope="session")
def tokenizer():
    """Trained once per session (≈ 10 ms); only ever read by the tests."""
    return train_tokenizer(SAMPLE_DOCUMENTS * 4, vocab_size=320)


@pytest.fixture
def text_folder(tmp_path: Path) -> Path:
    """A folder of .txt/.md documents, one nested, plus a file the default patterns skip."""
    root = tmp_path / "corpus"
    (root / "nested").mkdir(parents=True)
    for i, doc in enumerate(SAMPLE_DOCUMENTS[:3]):
        (root / f"doc{i}.txt").write_text(doc)
    (root / "nested" / "doc3.md").write_text(SAMPLE_DOCUMENTS[3])
    (root / "nested" / "doc4.txt").write_text(SAMPLE_DOCUMENTS[4])
    (root / "ignored.py").write_text("not a document\n")
    return root
