"""Tokenize a corpus once: packed train/validation token streams memory-mapped from .npy files.

Entries are keyed by (corpus fingerprint, tokenizer hash, split parameters), so changing any of
them tokenizes anew and nothing stale is ever read. Per key the cache directory holds

    <key>.train.npy  <key>.validation.npy   flat [N] streams `doc eos doc eos ...` (packing.py)
    <key>.json                              metadata, written last: the entry exists iff it does

Every file is written to a temporary name in the same directory, flushed, fsync-ed and then
renamed with os.replace (atomic on POSIX), so an interrupted run leaves either a complete entry or
no entry — never a truncated stream that a later run trusts. Token ids are stored as uint16 when
the vocabulary fits (half the disk and page cache of uint32), else uint32.

The token ids of the whole corpus are held in memory once while building (2 bytes per token for
vocabularies up to 65,536), which is fine up to a few GB of text.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerFast

from dlmoe._checks import check_float, check_int
from dlmoe._fs import atomic_write
from dlmoe.data.corpus import Corpus
from dlmoe.data.packing import pack_documents, packed_length, split_documents
from dlmoe.data.tokenizer import DocumentEncoder, document_encoder, special_ids, tokenizer_hash

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the stored layout changes, so old entries are not misread
SPLITS: tuple[str, ...] = ("train", "validation")


@dataclass(frozen=True)
class TokenSplits:
    """Read-only memory maps of the packed streams ([N] uint16 or uint32) and their metadata."""

    train: np.ndarray
    validation: np.ndarray
    meta: dict[str, Any]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (0 .. vocab_size − 1) fits in it, else uint32."""
    check_int("vocab_size", vocab_size, low=1, high=2**32)
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def cached_token_splits(
    corpus: Corpus,
    tokenizer: PreTrainedTokenizerFast,
    cache_dir: str | Path,
    *,
    validation_fraction: float = 0.05,
    seed: int = 0,
    chunk_chars: int = 1 << 20,
) -> TokenSplits:
    """Packed train/validation token streams of `corpus`, tokenized on the first call only.

    Documents are encoded with `encode_batch` in chunks of about `chunk_chars` characters (bounded
    memory, parallel across documents) and split by document with `split_documents(…, seed)`.
    Under data parallelism let one rank build the entry and the others wait at a barrier.
    """
    # Checked here, not after tokenizing the whole corpus.
    check_float("validation_fraction", validation_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    check_int("seed", seed, low=0)
    check_int("chunk_chars", chunk_chars, low=1)
    identity = {
        "version": CACHE_VERSION,
        "corpus_fingerprint": corpus.fingerprint(),
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "validation_fraction": float(validation_fraction),
        "seed": seed,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    prefix = cache_dir / key[:24]
    splits = _load(prefix, key)
    if splits is not None:
        logger.info("token cache hit for %s: %s", corpus.name, prefix)
        return splits
    meta = _build(corpus, tokenizer, prefix, {"key": key, "corpus": corpus.name, **identity}, chunk_chars)
    return _open(prefix, meta)


def _build(
    corpus: Corpus, tokenizer: PreTrainedTokenizerFast, prefix: Path, meta: dict[str, Any], chunk_chars: int
) -> dict[str, Any]:
    """Tokenize, split, write both streams, then commit the entry by writing its metadata."""
    started = time.perf_counter()
    dtype = token_dtype(len(tokenizer))
    documents = list(_encode_corpus(corpus, document_encoder(tokenizer), chunk_chars, dtype))
    if corpus.fingerprint() != meta["corpus_fingerprint"]:
        raise ValueError(f"corpus {corpus.name!r} changed while it was being tokenized; run again")
    train_index, validation_index = split_documents(len(documents), meta["validation_fraction"], meta["seed"])
    eos_id = special_ids(tokenizer)[1]
    meta = {**meta, "vocab_size": len(tokenizer), "eos_id": eos_id, "dtype": dtype.name}
    for split, index in zip(SPLITS, (train_index, validation_index), strict=True):
        split_docs = [documents[i] for i in index]
        num_tokens = packed_length(len(doc) for doc in split_docs)
        write = functools.partial(
            _write_stream, documents=split_docs, eos_id=eos_id, dtype=dtype, num_tokens=num_tokens
        )
        atomic_write(_split_path(prefix, split), write)
        meta[f"num_documents_{split}"] = len(split_docs)
        meta[f"num_tokens_{split}"] = num_tokens
    atomic_write(prefix.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
    logger.info(
        "tokenized %s (%d documents, %d + %d tokens) in %.1f s into %s",
        corpus.name,
        len(documents),
        meta["num_tokens_train"],
        meta["num_tokens_validation"],
        time.perf_counter() - started,
        prefix,
    )
    return meta


def _encode_corpus(corpus: Corpus, encode: DocumentEncoder, chunk_chars: int, dtype: np.dtype) -> Iterator[np.ndarray]:
    """Token ids of each document, in corpus order, encoded a chunk of documents at a time."""
    for chunk in _chunks(corpus, chunk_chars):
        for ids in encode(chunk):
            yield np.asarray(ids, dtype=dtype)


def _chunks(documents: Iterable[str], chunk_chars: int) -> Iterator[list[str]]:
    chunk, num_chars = [], 0
    for document in documents:
        chunk.append(document)
        num_chars += len(document)
        if num_chars >= chunk_chars:
            yield chunk
            chunk, num_chars = [], 0
    if chunk:
        yield chunk


def _write_stream(path: Path, documents: list[np.ndarray], eos_id: int, dtype: np.dtype, num_tokens: int) -> None:
    stream_N = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(num_tokens,))
    pack_documents(documents, eos_id, out=stream_N)
    stream_N.flush()
    del stream_N  # close the map before the file is fsync-ed and renamed


def _split_path(prefix: Path, split: str) -> Path:
    return prefix.with_name(f"{prefix.name}.{split}.npy")


def _load(prefix: Path, key: str) -> TokenSplits | None:
    """The committed entry at `prefix`, or None when there is none or it does not check out."""
    meta_path = prefix.with_suffix(".json")
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("version") != CACHE_VERSION or meta.get("key") != key:
            raise ValueError(f"version/key mismatch in {meta_path}")
        return _open(prefix, meta)
    except (OSError, ValueError) as error:  # json.JSONDecodeError is a ValueError
        logger.warning("ignoring unusable token cache entry %s (%s); rebuilding", meta_path, error)
        return None


def _open(prefix: Path, meta: dict[str, Any]) -> TokenSplits:
    streams = {}
    for split in SPLITS:
        stream_N = np.load(_split_path(prefix, split), mmap_mode="r")
        expected = ((meta[f"num_tokens_{split}"],), np.dtype(meta["dtype"]))
        if (stream_N.shape, stream_N.dtype) != expected:
            raise ValueError(f"{split} stream is {stream_N.shape} {stream_N.dtype}, meta says {expected}")
        streams[split] = stream_N
    return TokenSplits(train=streams["train"], validation=streams["validation"], meta=meta)
