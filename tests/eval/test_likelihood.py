"""MC-ELBO likelihood: exact for one token, equal to the enumerated ELBO, stratified, deterministic."""

import itertools
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from dlmoe.eval import greedy_matches, mc_log_likelihood, random_masks, stratified_mask_counts
from dlmoe.eval.likelihood import draw_masks
from tests.eval.conftest import tiny_model

PROMPT = [5, 9, 3, 14]


def exact_elbo(model, prompt: list[int], answer: list[int]) -> float:
    """−E_l E_{|S|=l} (A/l) Σ_S CE by enumerating every l and every subset S (tiny A only)."""
    length = len(answer)
    total = 0.0
    for count in range(1, length + 1):
        subsets = list(itertools.combinations(range(length), count))
        for subset in subsets:
            noisy = list(answer)
            for i in subset:
                noisy[i] = model.config.mask_id
            logits = model(torch.tensor([prompt + noisy])).logits[0].double()
            ce = sum(F.cross_entropy(logits[len(prompt) + i], torch.tensor(answer[i])).item() for i in subset)
            total += (length / count) * ce / len(subsets) / length
    return -total


@torch.no_grad()
def test_one_answer_token_gives_the_exact_log_probability() -> None:
    model = tiny_model()
    [estimate] = mc_log_likelihood(model, [(PROMPT, [7])], mc_num=5, batch_size=3)
    logits = model(torch.tensor([PROMPT + [model.config.mask_id]])).logits[0, -1].double()
    assert estimate.log_likelihood == pytest.approx(logits.log_softmax(-1)[7].item(), abs=1e-5)
    assert estimate.std_error == pytest.approx(0.0, abs=1e-6)  # every sample is the same forward


@torch.no_grad()
@pytest.mark.parametrize("answer", [[7, 11], [4, 4, 19]])
def test_many_samples_match_the_enumerated_elbo(answer) -> None:
    model = tiny_model()
    exact = exact_elbo(model, PROMPT, answer)
    [estimate] = mc_log_likelihood(model, [(PROMPT, answer)], mc_num=4000, batch_size=2000, seed=3)
    assert abs(estimate.log_likelihood - exact) < max(4 * estimate.std_error, 1e-3), (estimate, exact)
    assert estimate.std_error < 0.02 and estimate.num_tokens == len(answer)


@torch.no_grad()
def test_mc_num_a_multiple_of_the_answer_enumerates_the_counts_exactly() -> None:
    """|a| = 2 with mc_num = 2: l = 1 and l = 2 once each; l = 2 is one mask, l = 1 one of two subsets."""
    model = tiny_model()
    answer = [7, 11]
    values = {
        round(mc_log_likelihood(model, [(PROMPT, answer)], mc_num=2, seed=s)[0].log_likelihood, 5) for s in range(40)
    }
    assert len(values) == 2  # which single token the l = 1 sample masks is the only randomness
    assert sum(values) / 2 == pytest.approx(exact_elbo(model, PROMPT, answer), abs=1e-5)


def test_stratified_counts_cover_every_count_evenly_when_n_is_a_multiple() -> None:
    generator = torch.Generator().manual_seed(0)
    for length, samples in [(4, 8), (5, 5), (7, 21), (2, 16), (8, 16), (1, 3)]:
        for _ in range(20):
            counts = stratified_mask_counts(length, samples, generator)
            assert Counter(counts.tolist()) == {c: samples // length for c in range(1, length + 1)}


@pytest.mark.parametrize(("length", "samples"), [(4, 8), (5, 3), (8, 16), (3, 7)])
def test_every_stratified_row_is_uniform_over_the_counts(length, samples) -> None:
    """Also at half-integer offsets i·A/N, where ties rounded to even (torch.round) would skip counts."""
    generator = torch.Generator().manual_seed(1)
    draws = torch.stack([stratified_mask_counts(length, samples, generator) for _ in range(1500)])  # [1500, N]
    for row in draws.T:
        frequency = torch.bincount(row, minlength=length + 1)[1:].double() / len(row)
        assert torch.allclose(frequency, torch.full((length,), 1 / length, dtype=torch.float64), atol=0.05)


def test_stratified_counts_follow_llada_formula() -> None:
    for seed in range(10):
        counts = stratified_mask_counts(6, 4, torch.Generator().manual_seed(seed))
        k = int(torch.randint(1, 7, (), generator=torch.Generator().manual_seed(seed)))
        expected = [((math.floor(k + i * 6 / 4 + 0.5) - 1) % 6) + 1 for i in range(4)]
        assert counts.tolist() == expected


def test_random_masks_mask_exactly_the_count_uniformly() -> None:
    generator = torch.Generator().manual_seed(0)
    counts = torch.tensor([1, 2, 3] * 2000)
    masks = random_masks(counts, 4, generator)
    assert masks.sum(1).tolist() == counts.tolist()
    frequency = masks.float().mean(0)
    assert torch.allclose(frequency, torch.full((4,), 0.5), atol=0.03)


@torch.no_grad()
def test_deterministic_and_independent_of_neighbours_order_and_batch_size() -> None:
    model = tiny_model()
    pairs = [(PROMPT, [7, 8, 9]), ([3], [12]), ([], [4, 5, 6, 7, 8]), (PROMPT * 2, [11, 10])]
    base = mc_log_likelihood(model, pairs, mc_num=8, batch_size=5, seed=1)
    again = mc_log_likelihood(model, pairs[::-1], mc_num=8, batch_size=3, seed=1)[::-1]
    alone = [mc_log_likelihood(model, [p], mc_num=8, batch_size=8, seed=1)[0] for p in pairs]
    for a, b, c in zip(base, again, alone, strict=True):  # padding and batch neighbours change nothing
        assert a.log_likelihood == pytest.approx(b.log_likelihood, abs=1e-4)
        assert a.log_likelihood == pytest.approx(c.log_likelihood, abs=1e-4)
    other_seed = mc_log_likelihood(model, pairs, mc_num=8, batch_size=5, seed=2)
    assert any(abs(a.log_likelihood - b.log_likelihood) > 1e-4 for a, b in zip(base, other_seed, strict=True))
    assert all(e.log_likelihood < 0 for e in base)


@torch.no_grad()
def test_long_prompts_lose_their_oldest_tokens() -> None:
    model = tiny_model()  # max_seq_len 24
    long_prompt = list(range(3, 23)) * 2  # 40 tokens
    answer = [7, 8]
    [cut] = mc_log_likelihood(model, [(long_prompt, answer)], mc_num=4, seed=0)
    [kept] = mc_log_likelihood(model, [(long_prompt[-22:], answer)], mc_num=4, seed=0)
    assert cut == kept  # the noise seed hashes the pair as scored, after the cut


@torch.no_grad()
def test_greedy_match_is_argmax_with_every_answer_token_masked() -> None:
    model = tiny_model()
    mask = model.config.mask_id
    logits = model(torch.tensor([PROMPT + [mask, mask]])).logits[0, -2:]
    greedy = logits.argmax(-1).tolist()
    other = [(greedy[0] + 1) % 20 + 3, greedy[1]]
    assert greedy_matches(model, [(PROMPT, greedy), (PROMPT, other)], batch_size=1) == [True, False]


@torch.no_grad()
def test_training_mode_is_restored_and_not_used() -> None:
    model = tiny_model().train()
    [estimate] = mc_log_likelihood(model, [(PROMPT, [7])], mc_num=1)
    assert model.training
    logits = model.eval()(torch.tensor([PROMPT + [0]])).logits[0, -1].double()
    assert estimate.log_likelihood == pytest.approx(logits.log_softmax(-1)[7].item(), abs=1e-5)


@pytest.mark.parametrize(
    ("pairs", "kwargs", "match"),
    [
        ([(PROMPT, [7])], {"mc_num": 0}, "mc_num must be >= 1"),
        ([(PROMPT, [7])], {"batch_size": 0}, "batch_size must be >= 1"),
        ([(PROMPT, [7])], {"seed": 1.5}, "seed must be an int"),
        ([], {}, "pairs must be a non-empty sequence"),
        ([(PROMPT,)], {}, r"pairs\[0\] must be a \(prompt_ids, answer_ids\) pair"),
        ([(PROMPT, [])], {}, "empty answer"),
        ([(PROMPT, [0, 7])], {}, "must not contain mask_id=0"),
        ([(PROMPT, [99])], {}, r"ids outside \[0, 23\)"),
        ([(PROMPT, "ab")], {}, "must be a sequence of token ids"),
        ([([], list(range(3, 23)) * 2)], {}, "more than model.max_seq_len=24"),
    ],
)
def test_bad_input_is_a_clear_error(pairs, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        mc_log_likelihood(tiny_model(), pairs, **kwargs)


def test_a_non_dlmoe_model_is_refused() -> None:
    with pytest.raises(ValueError, match="model must be a DiffusionTransformer"):
        mc_log_likelihood(lambda x: x, [(PROMPT, [7])])


# ----------------------------------------------------------------------------- block-causal models


def test_draw_masks_split_block_causal_answers_at_attention_blocks() -> None:
    generator = torch.Generator().manual_seed(0)
    masked, weight = draw_masks(3, 5, 12, generator, block_size=2)  # answer columns 3..7: blocks 1, 2 2, 3 3
    assert masked[:, :1].all() and (weight[:, 0] == 1).all()
    for start, end in [(1, 3), (3, 5)]:
        counts = masked[:, start:end].sum(1)
        assert Counter(counts.tolist()) == {1: 6, 2: 6}
        assert torch.equal(weight[:, start], 2 / counts.double()) and torch.equal(weight[:, start], weight[:, end - 1])
    masked, weight = draw_masks(3, 5, 10, torch.Generator().manual_seed(0))  # bidirectional: one span
    assert torch.equal(weight[:, 0], 5 / masked.sum(1).double())


@torch.no_grad()
def exact_block_elbo(model, prompt: list[int], answer: list[int]) -> float:
    """Σ over answer blocks of the enumerated ELBO of the block given clean earlier blocks (two streams)."""
    size = model.config.attention_block_size
    clean = torch.tensor([prompt + answer])
    total = 0.0
    columns = range(len(prompt), len(prompt) + len(answer))
    for _, group in itertools.groupby(columns, key=lambda c: c // size):
        block = list(group)
        for count in range(1, len(block) + 1):
            subsets = list(itertools.combinations(block, count))
            for subset in subsets:
                noisy = clean.clone()
                noisy[0, list(subset)] = model.config.mask_id
                logits = model(noisy, clean_input_ids=clean).logits[0].double()
                ce = sum(F.cross_entropy(logits[c], clean[0, c]).item() for c in subset)
                total += (len(block) / count) * ce / len(subsets) / len(block)
    return -total


@torch.no_grad()
def test_block_causal_one_token_is_exact_and_many_samples_match_the_block_elbo() -> None:
    model = tiny_model(attention="block_causal", attention_block_size=2)
    [one] = mc_log_likelihood(model, [(PROMPT, [7])], mc_num=3)
    logits = model(torch.tensor([PROMPT + [model.config.mask_id]])).logits[0, -1].double()
    assert one.log_likelihood == pytest.approx(logits.log_softmax(-1)[7].item(), abs=1e-5)
    answer = [7, 11, 4]  # columns 4, 5, 6: blocks 2 2 3
    exact = exact_block_elbo(model, PROMPT, answer)
    [estimate] = mc_log_likelihood(model, [(PROMPT, answer)], mc_num=4000, batch_size=2000, seed=3)
    assert abs(estimate.log_likelihood - exact) < max(4 * estimate.std_error, 1e-3), (estimate, exact)
    # not the single-stream bound: earlier answer blocks are clean, not noised
    assert abs(exact - exact_elbo(model, PROMPT, answer)) > 10 * estimate.std_error
