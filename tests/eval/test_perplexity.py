"""Text perplexity bound: chunks, bits per byte from bytes, determinism, file checks."""

import math
from pathlib import Path

import pytest

from dlmoe.eval import mc_log_likelihood, read_text_file, text_elbo, text_encoder
from dlmoe.inference import load_run

TEXT = "The king speaks of stars and seas; the queen answers with 3 roses and a song. Scene 9.\n" * 3


@pytest.fixture(scope="module")
def run(trained_run: Path):
    _, model, tokenizer = load_run(trained_run)
    return model, tokenizer


def test_bound_is_the_sum_of_chunk_elbos(run) -> None:
    model, tokenizer = run
    bound = text_elbo(model, tokenizer, TEXT, seq_len=16, mc_num=3, seed=5)
    ids = text_encoder(tokenizer)(TEXT)
    chunks = [([], ids[i : i + 16]) for i in range(0, len(ids), 16)]
    nll = -sum(e.log_likelihood for e in mc_log_likelihood(model, chunks, mc_num=3, seed=5))
    assert bound.tokens == len(ids) and bound.chunks == math.ceil(len(ids) / 16) and bound.bytes == len(TEXT)
    assert bound.nelbo_nats_per_token == pytest.approx(nll / len(ids))
    assert bound.bits_per_byte == pytest.approx(nll / math.log(2) / len(TEXT.encode()))
    assert bound.ppl_upper_bound == pytest.approx(math.exp(bound.nelbo_nats_per_token))
    assert 0 < bound.std_error_nats_per_token < bound.nelbo_nats_per_token
    assert text_elbo(model, tokenizer, TEXT, seq_len=16, mc_num=3, seed=5) == bound
    assert text_elbo(model, tokenizer, TEXT, seq_len=16, mc_num=3, seed=6) != bound


def test_special_token_strings_in_text_are_plain_bytes(run) -> None:
    model, tokenizer = run
    bound = text_elbo(model, tokenizer, "a <|mask|> b <|endoftext|>", mc_num=2)  # no "must not contain mask_id"
    assert bound.tokens > 4


def test_bad_input(run, tmp_path: Path) -> None:
    model, tokenizer = run
    with pytest.raises(ValueError, match="seq_len must be <= 64"):
        text_elbo(model, tokenizer, TEXT, seq_len=65)
    with pytest.raises(ValueError, match="text must be a non-empty string"):
        text_elbo(model, tokenizer, "")
    with pytest.raises(ValueError, match="does not exist"):
        read_text_file(tmp_path / "nope.txt", "--text")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="is empty"):
        read_text_file(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="is not UTF-8"):
        read_text_file(tmp_path / "latin1.txt")
