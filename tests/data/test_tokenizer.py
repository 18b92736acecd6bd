"""Byte-level BPE: special tokens, exact round trip, save/load, determinism."""

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from dlmoe.data import (
    EOS_TOKEN,
    MASK_TOKEN,
    PAD_TOKEN,
    document_encoder,
    load_tokenizer,
    special_ids,
    tokenizer_hash,
    train_tokenizer,
)

from .conftest import SAMPLE_DOCUMENTS

ROUND_TRIP_TEXTS = [
    *SAMPLE_DOCUMENTS,
    "  leading spaces, trailing spaces  \n\n\ttabs\r\nand CRLF",
    "unicode: café, naïve, 日本語, emoji 🙂, U+FFFD \ufffd",
    "punctuation , spacing . as ' is ; kept !",
]


def test_special_tokens_are_present_and_distinct(tokenizer: PreTrainedTokenizerFast) -> None:
    mask_id, eos_id, pad_id = special_ids(tokenizer)
    assert (mask_id, eos_id, pad_id) == (0, 1, 2)
    assert tokenizer.convert_ids_to_tokens([mask_id, eos_id, pad_id]) == [MASK_TOKEN, EOS_TOKEN, PAD_TOKEN]
    assert len(tokenizer) == 320


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_encode_round_trip(tokenizer: PreTrainedTokenizerFast, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_save_load_round_trip(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert special_ids(loaded) == special_ids(tokenizer)
    assert tokenizer_hash(loaded) == tokenizer_hash(tokenizer)
    for text in ROUND_TRIP_TEXTS:
        assert loaded.encode(text) == tokenizer.encode(text)
        assert loaded.decode(loaded.encode(text)) == text


def test_training_is_deterministic(tokenizer: PreTrainedTokenizerFast) -> None:
    again = train_tokenizer(SAMPLE_DOCUMENTS * 4, vocab_size=320)
    assert tokenizer_hash(again) == tokenizer_hash(tokenizer)
    other = train_tokenizer(SAMPLE_DOCUMENTS[::-1] * 4, vocab_size=300)
    assert tokenizer_hash(other) != tokenizer_hash(tokenizer)


def test_document_encoder_treats_special_strings_in_text_as_text(tokenizer: PreTrainedTokenizerFast) -> None:
    text = f"a {EOS_TOKEN} b {MASK_TOKEN}"
    [ids] = document_encoder(tokenizer)([text])
    assert not set(special_ids(tokenizer)) & set(ids)  # only packing inserts a real eos
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode(text) != ids  # the caller's tokenizer is left as it was
    assert document_encoder(tokenizer)(SAMPLE_DOCUMENTS[:2]) == [tokenizer.encode(d) for d in SAMPLE_DOCUMENTS[:2]]


def test_bad_input(tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        train_tokenizer(SAMPLE_DOCUMENTS, vocab_size=100)
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    no_mask = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token=EOS_TOKEN)
    with pytest.raises(ValueError, match=r"missing \['mask_token', 'pad_token'\]"):
        special_ids(no_mask)
