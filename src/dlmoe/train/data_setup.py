"""Corpus → tokenizer → cached token splits → batch iterators for a run.

The tokenizer is trained once per run folder (`<run_dir>/tokenizer`), or copied from the run a
fine-tune starts from, and reused on resume; token caches live in `data.cache_dir` (default
`<run_dir>/../.cache`) and are shared by runs.
"""

from __future__ import annotations

import functools
import itertools
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from dlmoe._fs import staged_folder
from dlmoe.config import RunConfig
from dlmoe.config_io import read_json
from dlmoe.data import BatchIterator, as_sequences, cached_token_splits, load_tokenizer, special_ids, train_tokenizer
from dlmoe.data.corpus import Corpus, resolve_corpus


@dataclass
class RunData:
    tokenizer: PreTrainedTokenizerFast
    special_ids: tuple[int, int, int]  # mask, eos, pad
    train_batches: BatchIterator
    validation_batches: list[torch.Tensor]  # fixed [B, L] batches
    bytes_per_token: float  # UTF-8 bytes per token on the validation batches (for bits per byte)


TOKENIZER_RECORD = "dlmoe_corpus.json"  # inside tokenizer/: which corpus it was trained on (or copied from)


def check_corpus(config: RunConfig) -> Corpus:
    """The run's corpus, resolved and checked to hold the >= 2 documents a train/validation split
    needs; reads at most two documents. Called before anything is written."""
    corpus = resolve_corpus(config.data.corpus)
    if sum(1 for _ in itertools.islice(iter(corpus), 2)) < 2:
        raise ValueError(
            f"data.corpus={config.data.corpus!r} holds fewer than 2 non-empty documents; a run needs at least 2 "
            "(train and validation are split by document): use a folder of files or a .jsonl with one per line"
        )
    return corpus


def prepare_data(config: RunConfig, run_dir: Path, *, tokenizer_from: Path | None = None) -> RunData:
    """`tokenizer_from`: a tokenizer folder to copy when the run has none yet (instead of training one).

    The run's tokenizer is written to `<run_dir>/tokenizer` only after the corpus was tokenized and
    both splits were accepted, so a rejected corpus leaves nothing behind in the run folder."""
    data, train = config.data, config.train
    corpus = check_corpus(config)  # fails before anything is written
    tokenizer_dir = run_dir / "tokenizer"
    save_tokenizer = None
    if (tokenizer_dir / "tokenizer.json").exists():
        _check_tokenizer_record(tokenizer_dir, corpus, config)
        tokenizer = load_tokenizer(tokenizer_dir)
    elif tokenizer_from is not None:
        tokenizer = load_tokenizer(tokenizer_from)
        save_tokenizer = functools.partial(_copy_tokenizer, tokenizer_from, {"copied_from": str(tokenizer_from)})
    else:
        tokenizer = train_tokenizer(corpus, vocab_size=data.vocab_size)
        record = {"corpus": corpus.name, "num_bytes": corpus.num_bytes(), "vocab_size": data.vocab_size}
        save_tokenizer = functools.partial(_save_tokenizer, tokenizer, record)
    cache_dir = Path(data.cache_dir) if data.cache_dir else run_dir.resolve().parent / ".cache"
    splits = cached_token_splits(
        corpus, tokenizer, cache_dir, validation_fraction=data.validation_fraction, seed=data.split_seed
    )
    train_batches = BatchIterator(splits.train, data.seq_len, train.batch_size, seed=train.seed)
    rows = as_sequences(splits.validation, data.seq_len)
    if len(rows) == 0:
        raise ValueError(
            f"the validation split holds fewer than data.seq_len={data.seq_len} tokens; "
            "raise data.validation_fraction or use a larger corpus"
        )
    rows = rows[: train.eval_batches * train.batch_size]
    validation = [
        torch.from_numpy(rows[i : i + train.batch_size].astype(np.int64)) for i in range(0, len(rows), train.batch_size)
    ]
    text_bytes = sum(len(tokenizer.decode(r.tolist()).encode("utf-8")) for r in rows)
    if save_tokenizer is not None:  # the corpus is accepted: now the run folder gets its tokenizer
        with staged_folder(tokenizer_dir, replace=True) as scratch:
            save_tokenizer(scratch)
    return RunData(tokenizer, special_ids(tokenizer), train_batches, validation, text_bytes / rows.size)


def _save_tokenizer(tokenizer: PreTrainedTokenizerFast, record: dict, folder: Path) -> None:
    tokenizer.save_pretrained(folder)
    (folder / TOKENIZER_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _copy_tokenizer(source: Path, record: dict, folder: Path) -> None:
    """Copy a (flat) tokenizer folder, with a record of where it came from."""
    for file in source.iterdir():
        if file.is_file() and file.name != TOKENIZER_RECORD:
            shutil.copyfile(file, folder / file.name)
    (folder / TOKENIZER_RECORD).write_text(json.dumps(record, indent=2) + "\n")


def _check_tokenizer_record(tokenizer_dir: Path, corpus: Corpus, config: RunConfig) -> None:
    """A run folder's tokenizer is reused only for the corpus it was trained on."""
    path = tokenizer_dir / TOKENIZER_RECORD
    if not path.is_file():
        return  # written by an older dlmoe, or copied from a source run by hand
    record = read_json(path, "the run's tokenizer record is damaged; start over with --overwrite")
    if "copied_from" in record:
        return  # a fine-tune keeps its source's tokenizer whatever corpus it trains on
    now = {"corpus": corpus.name, "num_bytes": corpus.num_bytes()}
    if any(record.get(k) != v for k, v in now.items()):
        raise ValueError(
            f"{str(tokenizer_dir)!r} was trained on corpus {record.get('corpus')!r} ({record.get('num_bytes')} bytes), "
            f"but data.corpus={config.data.corpus!r} is {now['corpus']!r} ({now['num_bytes']} bytes); "
            "use another run_dir, or --overwrite to start this one over"
        )
