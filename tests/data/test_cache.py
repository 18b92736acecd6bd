"""The token cache: exact contents, hits without re-tokenizing, keys, and crash safety."""

from pathlib import Path

import numpy as np
import pytest
from transformers import PreTrainedTokenizerFast

import dlmoe.data.cache as cache_module
from dlmoe.data import Corpus, cached_token_splits, pack_documents, special_ids, split_documents, token_dtype

from .conftest import SAMPLE_DOCUMENTS


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"  # apart from the corpus folder, which also lives in tmp_path


def _no_encoding(tokenizer):
    raise AssertionError("the corpus was tokenized again")


def _documents_of(stream: np.ndarray, eos_id: int) -> list[list[int]]:
    assert stream[-1] == eos_id
    cuts = np.flatnonzero(stream == eos_id)
    return [part[:-1].tolist() for part in np.split(stream, cuts + 1)[:-1]]


def test_entry_holds_each_split_packed_with_eos(text_folder: Path, tokenizer: PreTrainedTokenizerFast, cache_dir):
    splits = cached_token_splits(Corpus.from_folder(text_folder), tokenizer, cache_dir, validation_fraction=0.4)
    eos_id = special_ids(tokenizer)[1]
    train_index, validation_index = split_documents(len(SAMPLE_DOCUMENTS), 0.4, seed=0)
    for stream, index in ((splits.train, train_index), (splits.validation, validation_index)):
        assert stream.dtype == np.uint16 and not stream.flags.writeable
        assert _documents_of(stream, eos_id) == [tokenizer.encode(SAMPLE_DOCUMENTS[i]) for i in index]
    assert splits.meta["num_documents_validation"] == 2 and splits.meta["num_tokens_train"] == len(splits.train)


def test_second_call_is_a_hit(text_folder: Path, tokenizer: PreTrainedTokenizerFast, cache_dir, monkeypatch):
    corpus = Corpus.from_folder(text_folder)
    first = cached_token_splits(corpus, tokenizer, cache_dir)
    monkeypatch.setattr(cache_module, "document_encoder", _no_encoding)
    second = cached_token_splits(Corpus.from_folder(text_folder), tokenizer, cache_dir)  # a fresh Corpus object
    assert np.array_equal(first.train, second.train) and np.array_equal(first.validation, second.validation)
    with pytest.raises(AssertionError, match="tokenized again"):  # another split is another entry
        cached_token_splits(corpus, tokenizer, cache_dir, validation_fraction=0.5)
    (text_folder / "doc0.txt").write_text("an edited document\n")
    with pytest.raises(AssertionError, match="tokenized again"):  # so is an edited corpus
        cached_token_splits(corpus, tokenizer, cache_dir)


def _crash_on_call(crash_call: int):
    """A stand-in for pack_documents that half-fills its output on call `crash_call`, then dies."""
    calls = []

    def pack(documents, eos_id, out):
        calls.append(1)
        if len(calls) == crash_call:
            out[: len(out) // 2] = eos_id
            raise KeyboardInterrupt("simulated crash mid-write")
        return pack_documents(documents, eos_id, out=out)

    return pack


@pytest.mark.parametrize("crash_call", [1, 2])  # while writing train / validation (train already renamed)
def test_crash_mid_write_leaves_no_trusted_entry(
    crash_call: int, text_folder: Path, tokenizer: PreTrainedTokenizerFast, cache_dir, monkeypatch
):
    corpus = Corpus.from_folder(text_folder)
    monkeypatch.setattr(cache_module, "pack_documents", _crash_on_call(crash_call))
    with pytest.raises(KeyboardInterrupt):
        cached_token_splits(corpus, tokenizer, cache_dir)
    left = sorted(p.name for p in cache_dir.iterdir())
    assert not [name for name in left if name.endswith((".tmp", ".json", ".validation.npy"))]
    assert len(left) == crash_call - 1  # at most the complete train stream, which nothing trusts without meta
    monkeypatch.undo()
    rebuilt = cached_token_splits(corpus, tokenizer, cache_dir)
    documents = _documents_of(np.concatenate([rebuilt.train, rebuilt.validation]), special_ids(tokenizer)[1])
    assert sorted(documents) == sorted(tokenizer.encode(d) for d in SAMPLE_DOCUMENTS)


def test_a_damaged_entry_is_rebuilt(text_folder: Path, tokenizer: PreTrainedTokenizerFast, cache_dir, caplog):
    corpus = Corpus.from_folder(text_folder)
    expected = np.array(cached_token_splits(corpus, tokenizer, cache_dir).train)
    [train_path] = cache_dir.glob("*.train.npy")
    np.save(train_path, expected[:3])  # truncated behind the cache's back
    assert np.array_equal(cached_token_splits(corpus, tokenizer, cache_dir).train, expected)
    assert "ignoring unusable token cache entry" in caplog.text


def test_token_dtype() -> None:
    assert token_dtype(4096) == np.uint16 and token_dtype(2**16) == np.uint16  # ids 0..65535
    assert token_dtype(2**16 + 1) == np.uint32


def test_bad_split_is_refused_before_tokenizing(text_folder: Path, tokenizer, cache_dir, monkeypatch) -> None:
    monkeypatch.setattr(cache_module, "document_encoder", _no_encoding)
    with pytest.raises(ValueError, match=r"validation_fraction must be in \(0.0, 1.0\), got 1.0"):
        cached_token_splits(Corpus.from_folder(text_folder), tokenizer, cache_dir, validation_fraction=1.0)


def test_corpus_edited_while_tokenizing_is_not_cached(text_folder: Path, tokenizer, cache_dir, monkeypatch) -> None:
    real_encoder = cache_module.document_encoder

    def encoder_that_edits(tok):
        (text_folder / "doc0.txt").write_text("edited meanwhile\n")
        return real_encoder(tok)

    monkeypatch.setattr(cache_module, "document_encoder", encoder_that_edits)
    with pytest.raises(ValueError, match="changed while it was being tokenized"):
        cached_token_splits(Corpus.from_folder(text_folder), tokenizer, cache_dir)
    assert not list(cache_dir.iterdir())
