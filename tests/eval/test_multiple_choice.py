"""Multiple-choice scoring: ELBO argmax equals per-choice likelihoods, letter scoring reads the mask
position's letter logits, Wilson intervals, tokenizers without letter tokens are refused clearly."""

import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dlmoe.data.tokenizer import train_tokenizer
from dlmoe.eval import (
    McqItem,
    elbo_prompt,
    encode_pair,
    letter_prompt,
    letter_tokens,
    mc_log_likelihood,
    mcq_elbo,
    mcq_letter,
    score_mcq,
    text_encoder,
    wilson_interval,
)
from dlmoe.inference import load_run

ITEMS = [
    McqItem("The king speaks of", ("stars and seas", "a dog", "roses"), 0),
    McqItem("The queen answers with", ("a song", "roses and a song"), 1),
    McqItem("Scene", ("1.", "The king speaks"), 1),
]


@pytest.fixture(scope="module")
def run(trained_run: Path):
    _, model, tokenizer = load_run(trained_run)
    return model, tokenizer


def test_templates() -> None:
    item = ITEMS[1]
    assert elbo_prompt(item) == ("Question: The queen answers with\nAnswer:", [" a song", " roses and a song"])
    assert letter_prompt(item) == "Question: The queen answers with\nA. a song\nB. roses and a song\nAnswer:"


def test_encode_pair_moves_trailing_space_to_the_continuation(run) -> None:
    _, tokenizer = run
    encode = text_encoder(tokenizer)
    assert encode_pair(encode, "The king ", "speaks") == (encode("The king"), encode(" speaks"))
    assert encode_pair(encode, "", "x") == ([], encode("x"))


def test_elbo_prediction_is_the_argmax_of_the_choice_likelihoods(run) -> None:
    model, tokenizer = run
    result = mcq_elbo(model, tokenizer, ITEMS, mc_num=4, batch_size=8, seed=3)
    encode = text_encoder(tokenizer)
    for item, prediction in zip(ITEMS, result.predictions, strict=True):
        context, continuations = elbo_prompt(item)
        pairs = [encode_pair(encode, context, c) for c in continuations]
        scores = [e.log_likelihood for e in mc_log_likelihood(model, pairs, mc_num=4, seed=3)]
        assert prediction == max(range(len(scores)), key=scores.__getitem__)
    assert result.n == 3 and result.skipped == 0 and 0 <= result.accuracy_norm <= 1
    assert result.correct == sum(i.answer == p for i, p in zip(ITEMS, result.predictions, strict=True))
    assert result.chance == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert mcq_elbo(model, tokenizer, ITEMS, mc_num=4, batch_size=3, seed=3) == result  # batching changes nothing


@torch.no_grad()
def test_letter_prediction_reads_the_letter_logits_at_the_mask(run) -> None:
    model, tokenizer = run
    letters = letter_tokens(tokenizer, 3)
    encode = text_encoder(tokenizer)
    result = mcq_letter(model, tokenizer, ITEMS, batch_size=2)
    for item, prediction in zip(ITEMS, result.predictions, strict=True):
        ids = encode(letter_prompt(item)) + letters.prefix_ids + [model.config.mask_id]
        logits = model(torch.tensor([ids])).logits[0, -1]
        assert prediction == int(logits[letters.letter_ids[: len(item.choices)]].argmax())
    assert result.n == 3 and result.accuracy_norm is None and "accuracy_norm" not in result.as_dict()


def test_choices_longer_than_the_model_are_skipped(run) -> None:
    model, tokenizer = run
    long_item = McqItem("q", ("short", " ".join(["roses"] * 80)), 0)
    result = score_mcq(model, tokenizer, [*ITEMS[:1], long_item], "elbo", mc_num=2)
    assert result.n == 1 and result.skipped == 1 and result.predictions[1] == -1
    # a long question only loses its oldest tokens
    assert score_mcq(model, tokenizer, [McqItem("roses " * 80, ("a", "b"), 0)], "letter").n == 1


def _tokenizer_with_spaced_letters() -> PreTrainedTokenizerFast:
    return train_tokenizer([" A B C D E. the answer is A and B or C or D"] * 50, vocab_size=300, min_frequency=2)


def test_letter_tokens_prefer_spaced_letters_then_fall_back(run) -> None:
    spaced = letter_tokens(_tokenizer_with_spaced_letters(), 4)
    assert spaced.form == " A" and spaced.prefix_ids == [] and len(set(spaced.letter_ids)) == 4
    _, tokenizer = run  # the toy corpus has no " A" merge: a space token, then "A"
    bare = letter_tokens(tokenizer, 5)
    assert bare.form == "A" and len(bare.prefix_ids) == 1 and len(set(bare.letter_ids)) == 5


def test_a_tokenizer_without_letter_tokens_is_refused() -> None:
    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "Question": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match="letter scoring needs each of ' A'..' C'.*use method 'elbo'"):
        letter_tokens(tokenizer, 3)


@pytest.mark.parametrize(("correct", "n"), [(0, 10), (10, 10), (7, 20), (50, 100), (1, 1)])
def test_wilson_interval(correct, n) -> None:
    low, high = wilson_interval(correct, n)
    assert 0 <= low <= correct / n <= high <= 1
    if 0 < correct < n:  # close to the normal interval away from the edges
        se = math.sqrt(correct / n * (1 - correct / n) / n)
        assert high - low == pytest.approx(2 * 1.96 * se, rel=0.25)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)  # textbook value


def test_bad_arguments(run) -> None:
    model, tokenizer = run
    with pytest.raises(ValueError, match="method must be one of"):
        score_mcq(model, tokenizer, ITEMS, "mmlu")
    with pytest.raises(ValueError, match="correct must be <= 3"):
        wilson_interval(4, 3)
    with pytest.raises(ValueError, match="n must be >= 1"):
        wilson_interval(0, 0)
    empty = score_mcq(model, tokenizer, [], "letter")
    assert empty.n == 0 and empty.accuracy is None and empty.ci95 is None
