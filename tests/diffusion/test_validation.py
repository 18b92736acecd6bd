"""The validation ELBO evaluator equals a hand-written loop (single and two-stream), its data-parallel
hooks conserve the batch ELBO and the bin counts, and the bound formulas are the stated ones."""

import math

import pytest
import torch

from dlmoe.diffusion import (
    NUM_BINS,
    VALIDATION_SEED,
    add_mask_noise,
    bits_per_byte,
    perplexity_bound,
    validation_elbo,
)
from tests.diffusion.test_objective import MASK, elbo_by_hand, tiny_model, tokens


def batches() -> list[torch.Tensor]:
    return [tokens(rows=4, seed=1), tokens(rows=4, seed=2), tokens(rows=3, seed=3)]


@torch.no_grad()
def reference(model, data: list[torch.Tensor], antithetic: bool) -> tuple[float, dict[int, tuple[float, int]]]:
    """The validation ELBO written out: seed 1234, t ~ U(0, 1), 1/r weights, mean over batches; and per
    mask-ratio bin (⌊10·r⌋) the masked-token CE sum and count."""
    generator = torch.Generator().manual_seed(1234)
    losses, bins = [], {}
    for batch in data:
        noised = add_mask_noise(batch, MASK, antithetic=antithetic, generator=generator)
        clean = batch if model.config.block_causal else None
        logits = model(noised.noisy_ids, mask_ratio=noised.mask_ratio, clean_input_ids=clean).logits
        losses.append(float(elbo_by_hand(logits, batch, noised.masked)))
        logp = torch.log_softmax(logits.double(), -1).gather(-1, batch[..., None])[..., 0]
        for b in range(batch.shape[0]):
            i = min(int(noised.mask_ratio[b] * 10), 9)
            ce, n = bins.get(i, (0.0, 0))
            bins[i] = (ce - float(logp[b][noised.masked[b]].sum()), n + int(noised.masked[b].sum()))
    return sum(losses) / len(losses), bins


@pytest.mark.parametrize(("attention", "antithetic"), [("bidirectional", True), ("block_causal", False)])
def test_evaluator_equals_the_hand_written_loop(attention: str, antithetic: bool) -> None:
    model, data = tiny_model(attention), batches()
    result = validation_elbo(model, data, mask_id=MASK, two_stream=model.config.block_causal, antithetic=antithetic)
    elbo, bins = reference(model, data, antithetic)
    assert VALIDATION_SEED == 1234 and result.batches == 3
    assert result.nats_per_token == pytest.approx(elbo, rel=1e-5)
    got = {round(b["mask_ratio"][0] * NUM_BINS): b for b in result.bins}
    assert got.keys() == bins.keys()
    for i, (ce, n) in bins.items():
        assert got[i]["tokens"] == n and got[i]["ce"] == pytest.approx(ce / n, rel=1e-5)
        assert got[i]["mask_ratio"] == [i / 10, (i + 1) / 10]
    assert result.ppl_upper_bound == pytest.approx(math.exp(elbo), rel=1e-5)
    assert result.bits_per_byte(2.5) == pytest.approx(elbo / math.log(2) / 2.5, rel=1e-5)
    again = validation_elbo(model, data, mask_id=MASK, two_stream=model.config.block_causal, antithetic=antithetic)
    assert again == result  # fixed noise: the same numbers at every evaluation


class Rank:
    """One rank of a two-process world, in process: its rows; reductions left to the test."""

    world_size = 2

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def local_rows(self, batch: torch.Tensor) -> torch.Tensor:
        half = batch.shape[0] // 2
        return batch[self.rank * half : (self.rank + 1) * half]

    def mean(self, values: list[float]) -> list[float]:
        return values

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_ranks_skip_the_short_batch_and_their_shares_add_up_to_the_whole() -> None:
    model = tiny_model()
    data = [*batches()[:2], tokens(rows=1, seed=4)]  # the last batch has a row for one rank only
    whole = validation_elbo(model, data[:2], mask_id=MASK, two_stream=False, antithetic=True)
    ranks = [
        validation_elbo(model, data, mask_id=MASK, two_stream=False, antithetic=True, runtime=Rank(r)) for r in (0, 1)
    ]
    assert [r.batches for r in ranks] == [2, 2]
    # the mean over ranks (what runtime.mean does) of equal row shares is the whole batches' ELBO
    assert (ranks[0].nats_per_token + ranks[1].nats_per_token) / 2 == pytest.approx(whole.nats_per_token, rel=1e-6)
    tokens_by_bin: dict[float, int] = {}
    for rank in ranks:
        for b in rank.bins:
            tokens_by_bin[b["mask_ratio"][0]] = tokens_by_bin.get(b["mask_ratio"][0], 0) + b["tokens"]
    assert tokens_by_bin == {b["mask_ratio"][0]: b["tokens"] for b in whole.bins}  # runtime.sum conserves counts


def test_bits_per_byte_and_perplexity_bound_formulas() -> None:
    assert bits_per_byte(3 * math.log(2), 1.5) == pytest.approx(2.0)  # 3 bits per token over 1.5 bytes
    assert bits_per_byte(0.0, 4.0) == 0.0
    assert perplexity_bound(math.log(7.0)) == pytest.approx(7.0)
    assert perplexity_bound(1e6) == math.exp(700.0)  # capped: no overflow for a diverged model
    assert math.isnan(bits_per_byte(math.nan, 2.0))  # a diverged ELBO is reported, not refused
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="bytes_per_token"):
            bits_per_byte(1.0, bad)
    with pytest.raises(ValueError, match="nats_per_token"):
        perplexity_bound("1.0")


def test_bad_evaluator_input_is_clear() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="num_bins"):
        validation_elbo(model, batches(), mask_id=MASK, two_stream=False, antithetic=True, num_bins=0)
    with pytest.raises(ValueError, match="no validation batch"):
        validation_elbo(model, [], mask_id=MASK, two_stream=False, antithetic=True)
