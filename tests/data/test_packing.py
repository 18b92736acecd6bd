"""Packing with eos, the split by document, the dataset and the resumable batch iterator."""

import json

import numpy as np
import pytest
import torch

from dlmoe.data import BatchIterator, TokenSequenceDataset, as_sequences, pack_documents, packed_length, split_documents

EOS = 1


def test_pack_documents_puts_eos_after_every_document() -> None:
    documents = [[5, 6], [7], np.array([8, 9, 10])]
    stream = pack_documents(documents, EOS)
    assert stream.tolist() == [5, 6, EOS, 7, EOS, 8, 9, 10, EOS]
    assert stream.dtype == np.int64 and packed_length([2, 1, 3]) == len(stream)
    out = np.zeros(9, dtype=np.uint16)
    assert pack_documents(documents, EOS, out=out) is out and out.tolist() == stream.tolist()
    with pytest.raises(ValueError, match=r"out must have shape \(9,\)"):
        pack_documents(documents, EOS, out=np.zeros(8, dtype=np.uint16))


def test_as_sequences_drops_the_partial_row_without_copying() -> None:
    stream = pack_documents([[5, 6], [7], [8, 9, 10]], EOS)
    rows = as_sequences(stream, 4)
    assert rows.tolist() == [[5, 6, EOS, 7], [EOS, 8, 9, 10]]  # the final eos is dropped
    assert np.shares_memory(rows, stream)
    assert as_sequences(stream, 10).shape == (0, 10)


def test_split_is_deterministic_disjoint_and_covers_all() -> None:
    train, validation = split_documents(100, 0.1, seed=3)
    again_train, again_validation = split_documents(100, 0.1, seed=3)
    assert np.array_equal(train, again_train) and np.array_equal(validation, again_validation)
    assert len(validation) == 10 and sorted([*train, *validation]) == list(range(100))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(validation) > 0)  # corpus order kept
    assert not np.array_equal(split_documents(100, 0.1, seed=4)[1], validation)


@pytest.mark.parametrize("fraction", [0.001, 0.5, 0.999])
def test_split_keeps_at_least_one_document_each_side(fraction: float) -> None:
    train, validation = split_documents(2, fraction)
    assert len(train) == 1 and len(validation) == 1


def test_split_bad_input() -> None:
    with pytest.raises(ValueError, match="num_documents must be >= 2.*got 1"):
        split_documents(1, 0.1)
    for fraction in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match=r"validation_fraction must be in \(0.0, 1.0\)"):
            split_documents(10, fraction)


def test_dataset_yields_int64_rows() -> None:
    stream = np.arange(23, dtype=np.uint16)
    dataset = TokenSequenceDataset(stream, seq_len=5)
    assert len(dataset) == 4
    assert dataset[1].dtype == torch.int64 and dataset[1].tolist() == [5, 6, 7, 8, 9]


def test_batch_iterator_visits_each_row_once_per_epoch() -> None:
    stream = np.arange(40, dtype=np.uint16)  # 10 rows of 4, rows start at multiples of 4
    batches = BatchIterator(stream, seq_len=4, batch_size=3, seed=0)
    assert batches.batches_per_epoch == 3
    epochs = []
    for _ in range(2):
        epoch = torch.cat([next(batches) for _ in range(3)])  # [9, 4]
        assert epoch.dtype == torch.int64 and torch.equal(epoch[:, 1:] - epoch[:, :-1], torch.ones(9, 3).long())
        starts = (epoch[:, 0] // 4).tolist()
        assert len(set(starts)) == 9  # without replacement; one row left over
        epochs.append(starts)
    assert epochs[0] != epochs[1] and batches.epoch == 1


def test_batch_iterator_resumes_at_the_same_batch() -> None:
    stream = np.arange(7 * 50, dtype=np.uint16)
    batches = BatchIterator(stream, seq_len=7, batch_size=4, seed=11)  # 12 batches per epoch
    for _ in range(10):
        next(batches)
    state = json.loads(json.dumps(batches.state_dict()))  # survives a JSON checkpoint
    expected = [next(batches) for _ in range(20)]  # crosses two epoch boundaries
    resumed = BatchIterator(stream, seq_len=7, batch_size=4, seed=0)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, (next(resumed) for _ in range(20)), strict=True))


def test_batch_iterator_bad_input() -> None:
    stream = np.arange(40, dtype=np.uint16)
    with pytest.raises(ValueError, match=r"batch_size must be <= the number of sequences \(5"):
        BatchIterator(stream, seq_len=8, batch_size=6, seed=0)
    state = BatchIterator(stream, seq_len=8, batch_size=2, seed=0).state_dict()
    with pytest.raises(ValueError, match=r"state\['batch_size'\] must equal this iterator's batch_size \(3\)"):
        BatchIterator(stream, seq_len=8, batch_size=3, seed=0).load_state_dict(state)
