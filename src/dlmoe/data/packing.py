"""From tokenized documents to fixed-length training sequences and reproducible batches.

Documents are packed into one flat token stream, each followed by eos (GPT-style): no padding is
wasted, and the model learns where documents end. The stream is cut into `seq_len` rows with the
last partial row dropped, so a row may start mid-document — the usual trade for no padding.

The train/validation split is by document (not by row), so no document leaks into both.
`BatchIterator` draws rows in a seeded permutation per epoch; its state is three integers, so a
resumed run sees exactly the batches an uninterrupted one would have.

Shape letters: N tokens in a flat stream, S sequences (rows), L sequence length, B batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from dlmoe._checks import check_float, check_int


def packed_length(document_lengths: Iterable[int]) -> int:
    """Length of the stream `pack_documents` makes: every token plus one eos per document."""
    return sum(length + 1 for length in document_lengths)


def pack_documents(
    documents: Iterable[Sequence[int] | np.ndarray], eos_id: int, out: np.ndarray | None = None
) -> np.ndarray:
    """Concatenate documents as `doc_0 eos doc_1 eos ...` into a flat [N] array.

    Writes into `out` when given (e.g. a memory map of exactly `packed_length` tokens), else
    returns a new int64 array.
    """
    documents = [np.asarray(doc) for doc in documents]
    num_tokens_N = packed_length(len(doc) for doc in documents)
    if out is None:
        out = np.empty(num_tokens_N, dtype=np.int64)
    if out.shape != (num_tokens_N,):
        raise ValueError(f"out must have shape ({num_tokens_N},), got {out.shape}")
    start = 0
    for doc in documents:
        out[start : start + len(doc)] = doc
        out[start + len(doc)] = eos_id
        start += len(doc) + 1
    return out


def as_sequences(tokens_N: np.ndarray, seq_len: int) -> np.ndarray:
    """View a flat stream as [S, L] rows, S = N // L; the partial last row is dropped (no copy)."""
    check_int("seq_len", seq_len, low=1)
    if tokens_N.ndim != 1:
        raise ValueError(f"tokens must be a 1-D token stream, got shape {tokens_N.shape}")
    num_sequences_S = len(tokens_N) // seq_len
    return tokens_N[: num_sequences_S * seq_len].reshape(num_sequences_S, seq_len)


def split_documents(num_documents: int, validation_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) of a seeded split by document, each sorted in corpus order.

    The validation share is round(num_documents · fraction), clamped so each side gets at least
    one document: a validation loss is always defined and training never runs on nothing.
    """
    check_int("num_documents", num_documents)
    if num_documents < 2:
        raise ValueError(
            f"num_documents must be >= 2 to split into train and validation, got {num_documents}; "
            "add documents (e.g. split a single large file into several)"
        )
    check_float("validation_fraction", validation_fraction, low=0.0, high=1.0, low_open=True, high_open=True)
    check_int("seed", seed, low=0)
    num_validation = min(max(round(num_documents * validation_fraction), 1), num_documents - 1)
    order = np.random.default_rng(seed).permutation(num_documents)
    return np.sort(order[num_validation:]), np.sort(order[:num_validation])


class TokenSequenceDataset(Dataset):
    """Map-style dataset of the [L] int64 rows of a flat token stream, in order (for evaluation)."""

    def __init__(self, tokens_N: np.ndarray, seq_len: int):
        self.rows_SL = as_sequences(tokens_N, seq_len)

    def __len__(self) -> int:
        return len(self.rows_SL)

    def __getitem__(self, index: int) -> Tensor:
        # int64: the dtype embeddings and cross-entropy expect; the cache stores uint16/uint32.
        return torch.from_numpy(self.rows_SL[index].astype(np.int64))


class BatchIterator:
    """Endless [B, L] int64 batches of rows drawn without replacement, reshuffled every epoch.

    Epoch e visits the rows in `default_rng([seed, e]).permutation(S)`; the S mod B rows left over
    at the end of an epoch are skipped, so every batch is full. The position in this sequence is
    (epoch, position), which `state_dict` saves and `load_state_dict` restores exactly.
    """

    def __init__(self, tokens_N: np.ndarray, seq_len: int, batch_size: int, seed: int = 0):
        self.rows_SL = as_sequences(tokens_N, seq_len)
        self.seq_len = seq_len
        self.batch_size = check_int("batch_size", batch_size, low=1)
        if len(self.rows_SL) < batch_size:
            raise ValueError(
                f"batch_size must be <= the number of sequences ({len(self.rows_SL)} of length {seq_len} "
                f"from {len(tokens_N)} tokens), got {batch_size}"
            )
        self.seed = check_int("seed", seed, low=0)
        self.epoch, self.position = 0, 0
        self._order_S = self._permutation(0)

    @property
    def num_sequences(self) -> int:
        return len(self.rows_SL)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_sequences // self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Tensor:
        if self.position + self.batch_size > self.num_sequences:
            self.epoch, self.position = self.epoch + 1, 0
            self._order_S = self._permutation(self.epoch)
        index_B = self._order_S[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return torch.from_numpy(self.rows_SL[index_B].astype(np.int64))  # [B, L]

    def state_dict(self) -> dict[str, int]:
        """Where the iterator is, plus the shape it was built for (checked when loading)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "num_sequences": self.num_sequences,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; refuses a state saved for other data, lengths or batch size."""
        for key in ("seq_len", "batch_size", "num_sequences"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"state[{key!r}] must equal this iterator's {key} ({getattr(self, key)}) to resume the same "
                    f"batches, got {state.get(key)!r}"
                )
        self.seed = check_int("state['seed']", state["seed"], low=0)
        self.epoch = check_int("state['epoch']", state["epoch"], low=0)
        self.position = check_int("state['position']", state["position"], low=0, high=self.num_sequences)
        self._order_S = self._permutation(self.epoch)
