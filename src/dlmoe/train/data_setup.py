"""Corpus → tokenizer → cached token splits → batch iterators for a run.

The tokenizer is trained once per run folder (`<run_dir>/tokenizer`), or copied from the run a
fine-tune starts from, and reused on resume; token caches live in `data.cache_dir` (default
`<run_dir>/../.cache`) and are shared by runs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from dlmoe.config import RunConfig
from dlmoe.data import BatchIterator, as_sequences, cached_token_splits, load_tokenizer, special_ids, train_tokenizer
from dlmoe.data.corpus import resolve_corpus


@dataclass
class RunData:
    tokenizer: PreTrainedTokenizerFast
    special_ids: tuple[int, int, int]  # mask, eos, pad
    train_batches: BatchIterator
    validation_batches: list[torch.Tensor]  # fixed [B, L] batches
    bytes_per_token: float  # UTF-8 bytes per token on the validation batches (for bits per byte)


def prepare_data(config: RunConfig, run_dir: Path, *, tokenizer_from: Path | None = None) -> RunData:
    """`tokenizer_from`: a tokenizer folder to copy when the run has none yet (instead of training one)."""
    data, train = config.data, config.train
    corpus = resolve_corpus(data.corpus)  # fails before anything is written
    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = run_dir / "tokenizer"
    if tokenizer_from is not None and not (tokenizer_dir / "tokenizer.json").exists():
        _copy_tokenizer(tokenizer_from, tokenizer_dir)
    if (tokenizer_dir / "tokenizer.json").exists():
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        tokenizer = train_tokenizer(corpus, vocab_size=data.vocab_size)
        tokenizer.save_pretrained(tokenizer_dir)
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
    return RunData(tokenizer, special_ids(tokenizer), train_batches, validation, text_bytes / rows.size)


def _copy_tokenizer(source: Path, target: Path) -> None:
    """Copy a (flat) tokenizer folder; tokenizer.json last, since its presence marks a complete copy."""
    target.mkdir(parents=True, exist_ok=True)
    for file in sorted((f for f in source.iterdir() if f.is_file()), key=lambda f: f.name == "tokenizer.json"):
        shutil.copyfile(file, target / file.name)
