"""LLaDA sampler: quotas, blocks, greedy reference, batching, sampling, EOS stop, bad input."""

from types import SimpleNamespace

import pytest
import torch

from dlmoe.sampling import (
    GenerationResult,
    StepInfo,
    commit_schedule,
    finished_at_eos,
    generate,
    select_commits,
)

VOCAB = 11
MASK = 10
EOS = 9


class TableModel:
    """Deterministic fake denoiser: logits = table[position] + a context term that depends on every
    visible token and its position, so each commit changes the predictions. Rows are independent."""

    def __init__(self, max_len: int = 64, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table_LV = torch.randn(max_len, VOCAB, generator=g) * 2.0
        self.embed_VV = torch.randn(VOCAB, VOCAB, generator=g)
        self.position_weight_L = torch.rand(max_len, generator=g) + 0.5
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, x_BL: torch.Tensor, mask_ratio_B: torch.Tensor) -> torch.Tensor:
        self.calls.append((x_BL.clone(), mask_ratio_B.clone()))
        length = x_BL.shape[1]
        visible_BL = (x_BL != MASK).float() * self.position_weight_L[:length]
        context_BV = (self.embed_VV[x_BL] * visible_BL[..., None]).sum(1) / length
        return self.table_LV[:length][None] + context_BV[:, None, :]


class ScriptedModel:
    """Predicts `targets_BL` at every position with confidence growing with `strength_BL`."""

    def __init__(self, targets_BL: torch.Tensor, strength_BL: torch.Tensor) -> None:
        self.targets_BL, self.strength_BL = targets_BL, strength_BL
        self.num_calls = 0

    def __call__(self, x_BL: torch.Tensor, mask_ratio_B: torch.Tensor) -> torch.Tensor:
        self.num_calls += 1
        logits_BLV = torch.zeros(*x_BL.shape, VOCAB)
        logits_BLV.scatter_(2, self.targets_BL[..., None], self.strength_BL[..., None])
        return logits_BLV


def _prompt(batch: int = 2, length: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, EOS, (batch, length), generator=torch.Generator().manual_seed(seed))


def _reference_greedy(model, prompt_P: torch.Tensor, gen_length: int, block_length: int, steps: int) -> torch.Tensor:
    """One row, plain Python: per step, sort the block's masked positions by p(argmax) and commit."""
    x = prompt_P.tolist() + [MASK] * gen_length
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for block in range(num_blocks):
        start = len(prompt_P) + block * block_length
        masked_at_open = sum(x[i] == MASK for i in range(start, start + block_length))
        for j in range(steps_per_block):
            quota = -(-(masked_at_open - j) // steps_per_block)  # ceil((n - j) / s) == n // s + [j < n % s]
            row = torch.tensor([x])
            probs = torch.softmax(model(row, (row == MASK).float().mean(1))[0].double(), dim=-1)
            candidates = []
            for i in range(start, start + block_length):
                if x[i] == MASK:
                    allowed = probs[i].clone()
                    allowed[MASK] = -1.0
                    token = int(allowed.argmax())
                    candidates.append((-float(probs[i, token]), i, token))
            for _, i, token in sorted(candidates)[:quota]:
                x[i] = token
    return torch.tensor(x)


# ----------------------------------------------------------------------------- strategy parts


def test_commit_schedule_front_loads_the_remainder() -> None:
    quota = commit_schedule(torch.tensor([5, 6, 2, 0]), 3)
    assert quota.tolist() == [[2, 2, 1], [2, 2, 2], [1, 1, 0], [0, 0, 0]]


def test_select_commits_takes_top_quota_of_candidates_per_row() -> None:
    confidence = torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.2, 0.8, 0.3, 0.4]])
    candidates = torch.tensor([[False, True, True, True], [True, True, True, True]])
    commit = select_commits(confidence, candidates, torch.tensor([2, 5]))
    assert commit.tolist() == [[False, False, True, True], [True, True, True, True]]


def test_finished_at_eos_needs_no_mask_before_the_first_eos() -> None:
    x = torch.tensor([[1, 2, EOS, MASK], [1, MASK, EOS, 3], [1, 2, 3, 4], [1, EOS, MASK, EOS]])
    assert finished_at_eos(x[:, 1:], mask_id=MASK, eos_id=EOS).tolist() == [True, False, False, True]


# ----------------------------------------------------------------------------- generate


@pytest.mark.parametrize(("gen_length", "block_length", "steps"), [(12, 4, 6), (12, 12, 5), (8, 2, 8), (9, 3, 3)])
def test_each_step_commits_its_quota_inside_the_current_block(gen_length, block_length, steps) -> None:
    prompt = _prompt()
    infos: list[StepInfo] = []
    result = generate(
        TableModel(), prompt, gen_length=gen_length, block_length=block_length, steps=steps, mask_id=MASK,
        callback=infos.append,
    )  # fmt: skip
    steps_per_block = steps // (gen_length // block_length)
    expected = commit_schedule(torch.tensor([block_length]), steps_per_block)[0].tolist()
    assert [info.step for info in infos] == list(range(steps)) and result.num_forwards == steps
    previous = torch.cat([prompt, torch.full((2, gen_length), MASK)], 1)
    for info in infos:
        start = 3 + info.block * block_length
        assert info.committed.sum(1).tolist() == [expected[info.block_step]] * 2
        assert not info.committed[:, :start].any() and not info.committed[:, start + block_length :].any()
        assert bool((previous[info.committed] == MASK).all())  # only masked positions get committed
        assert torch.equal(info.tokens[~info.committed], previous[~info.committed])
        assert [len(p) for p in info.committed_positions()] == [expected[info.block_step]] * 2
        previous = info.tokens
        if info.block_step == steps_per_block - 1:  # a block is done before the next one opens
            assert not (info.tokens[:, : start + block_length] == MASK).any()
    assert torch.equal(previous, result.tokens)


def test_prompt_kept_no_mask_left_and_result_fields() -> None:
    prompt = _prompt(batch=3, length=4)
    model = TableModel()
    result = generate(model, prompt, gen_length=8, block_length=4, steps=4, mask_id=MASK)
    assert isinstance(result, GenerationResult)
    assert result.tokens.shape == (3, 12) and result.tokens.dtype == torch.int64
    assert torch.equal(result.tokens[:, :4], prompt) and torch.equal(result.generated, result.tokens[:, 4:])
    assert not (result.tokens == MASK).any()
    assert (result.num_blocks, result.steps_per_block, result.stopped_early) == (2, 2, False)
    assert all(torch.equal(x[:, :4], prompt) for x, _ in model.calls)


def test_model_receives_mask_ratio_of_the_full_row() -> None:
    model = TableModel()
    generate(model, _prompt(length=4), gen_length=8, block_length=4, steps=4, mask_id=MASK)
    expected_ratio = [8 / 12, 6 / 12, 4 / 12, 2 / 12]
    for (x, ratio), want in zip(model.calls, expected_ratio, strict=True):
        assert ratio.dtype == torch.float32 and ratio.shape == (2,)
        torch.testing.assert_close(ratio, (x == MASK).float().mean(1))
        torch.testing.assert_close(ratio, torch.full((2,), want))


@pytest.mark.parametrize(("gen_length", "block_length", "steps"), [(12, 4, 6), (12, 12, 12), (10, 5, 4), (6, 6, 4)])
def test_greedy_matches_plain_reference(gen_length, block_length, steps) -> None:
    model = TableModel(seed=3)
    prompt = _prompt(batch=3, length=5, seed=4)
    result = generate(model, prompt, gen_length=gen_length, block_length=block_length, steps=steps, mask_id=MASK)
    for b in range(3):
        expected = _reference_greedy(model, prompt[b], gen_length, block_length, steps)
        assert torch.equal(result.tokens[b], expected)


def test_batch_equals_single_rows() -> None:
    model = TableModel(seed=5)
    prompt = _prompt(batch=3, length=4, seed=6)
    kwargs = dict(gen_length=12, block_length=4, steps=6, mask_id=MASK)
    batched = generate(model, prompt, **kwargs).tokens
    for b in range(3):
        assert torch.equal(batched[b : b + 1], generate(model, prompt[b : b + 1], **kwargs).tokens)


def test_empty_prompt_is_refused_with_a_hint() -> None:
    with pytest.raises(ValueError, match="prompt row 0 is empty; give at least one token"):
        generate(TableModel(), torch.zeros(2, 0, dtype=torch.long), gen_length=6, block_length=3, steps=6, mask_id=MASK)
    with pytest.raises(ValueError, match="prompt row 1 is empty"):
        generate(TableModel(), [[1], []], gen_length=6, block_length=3, steps=6, mask_id=MASK)


def test_model_output_with_logits_attribute_and_int32_prompt() -> None:
    table = TableModel()
    prompt = _prompt()
    plain = generate(table, prompt, gen_length=4, block_length=4, steps=2, mask_id=MASK).tokens
    wrapped = lambda x, r: SimpleNamespace(logits=table(x, r))
    assert torch.equal(
        generate(wrapped, prompt.int(), gen_length=4, block_length=4, steps=2, mask_id=MASK).tokens, plain
    )


def test_random_remasking_commits_quota_and_is_reproducible() -> None:
    infos: list[StepInfo] = []
    run = lambda seed, callback=None: generate(
        TableModel(), _prompt(), gen_length=8, block_length=4, steps=6, remasking="random", mask_id=MASK,
        generator=torch.Generator().manual_seed(seed), callback=callback,
    ).tokens  # fmt: skip
    first = run(0, infos.append)
    assert [info.committed.sum(1).tolist() for info in infos] == [[2, 2], [1, 1], [1, 1]] * 2
    assert not (first == MASK).any() and torch.equal(first, run(0))


def test_temperature_sampling_is_reproducible_with_a_seed() -> None:
    run = lambda seed: generate(
        TableModel(), _prompt(batch=4), gen_length=16, block_length=8, steps=8, temperature=1.5, mask_id=MASK,
        generator=torch.Generator().manual_seed(seed),
    ).tokens  # fmt: skip
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))
    assert not (run(7) == MASK).any()


def test_gumbel_max_draws_follow_softmax_over_temperature() -> None:
    logits_V = torch.tensor([1.0, 0.0, -1.0, 0.5, 2.0, 0, 0, 0, 0, 0, 3.0])  # mask (id 10) is most likely
    model = lambda x, r: logits_V.expand(*x.shape, VOCAB)
    prompt = torch.zeros(20000, 1, dtype=torch.long)
    draws = generate(
        model, prompt, gen_length=1, block_length=1, steps=1, temperature=2.0, mask_id=MASK,
        generator=torch.Generator().manual_seed(0),
    ).generated[:, 0]  # fmt: skip
    allowed = logits_V.clone()
    allowed[MASK] = float("-inf")  # the mask token is never proposed
    expected = torch.softmax(allowed / 2.0, dim=0)
    torch.testing.assert_close(torch.bincount(draws, minlength=VOCAB) / 20000, expected, atol=0.02, rtol=0)


def test_never_commits_the_mask_token_even_when_the_model_prefers_it() -> None:
    model = ScriptedModel(torch.full((2, 8), MASK), torch.full((2, 8), 5.0))
    result = generate(model, _prompt(), gen_length=5, block_length=5, steps=5, mask_id=MASK)
    assert not (result.tokens == MASK).any()


# ----------------------------------------------------------------------------- EOS stop


def _eos_model(eos_at: list[int], length: int = 12) -> ScriptedModel:
    """Row b predicts EOS at eos_at[b] with top confidence, token 1 before it (next highest, falling
    left to right) and token 2 after it (least confident)."""
    targets = torch.full((len(eos_at), length), 2)
    strength = torch.full((len(eos_at), length), 0.5)
    for b, at in enumerate(eos_at):
        targets[b, :at], strength[b, :at] = 1, torch.linspace(4.0, 3.0, at)
        targets[b, at], strength[b, at] = EOS, 8.0
    return ScriptedModel(targets, strength)


def test_stop_at_eos_stops_once_the_prefix_is_complete_and_fills_with_eos() -> None:
    model = _eos_model([2 + 5])  # prompt of 2, EOS at generated index 5
    infos: list[StepInfo] = []
    kwargs = dict(gen_length=10, block_length=10, steps=10, mask_id=MASK, eos_id=EOS)
    result = generate(model, _prompt(batch=1, length=2), stop_at_eos=True, callback=infos.append, **kwargs)
    # step 1 commits EOS, steps 2-6 fill the 5 positions before it, then the row is finished
    assert result.num_forwards == model.num_calls == 6 and result.stopped_early
    assert result.generated[0].tolist() == [1] * 5 + [EOS] * 5
    assert [bool(info.finished[0]) for info in infos] == [False] * 5 + [True]
    full = generate(_eos_model([7]), _prompt(batch=1, length=2), **kwargs)
    assert full.num_forwards == 10 and not full.stopped_early
    assert full.generated[0].tolist() == [1] * 5 + [EOS] + [2] * 4


def test_stop_at_eos_batch_equals_single_rows() -> None:
    eos_at = [2 + 3, 2 + 9, 2 + 6]
    prompt = _prompt(batch=3, length=2)
    kwargs = dict(gen_length=12, block_length=4, steps=12, mask_id=MASK, eos_id=EOS, stop_at_eos=True)
    batched = generate(_eos_model(eos_at, 14), prompt, **kwargs)
    assert batched.num_forwards == 10  # the last row to finish needs 9 positions + its EOS
    for b in range(3):
        single = generate(_eos_model([eos_at[b]], 14), prompt[b : b + 1], **kwargs)
        assert torch.equal(batched.tokens[b : b + 1], single.tokens)
        assert single.generated[0, eos_at[b] - 2 :].eq(EOS).all()


# ----------------------------------------------------------------------------- bad input

GOOD = dict(gen_length=8, block_length=4, steps=4, mask_id=MASK)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(gen_length=0), "gen_length"),
        (dict(gen_length=-4), "gen_length"),
        (dict(block_length=0), "block_length"),
        (dict(block_length=3), "gen_length=8 must be a multiple of block_length=3"),
        (dict(steps=3), "steps=3 must be a multiple of the number of blocks"),
        (dict(steps=0), "steps"),
        (dict(steps=10), "steps must be <= 8"),
        (dict(steps=2.0), "steps must be an int"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(remasking="top_k"), "remasking must be one of"),
        (dict(mask_id=-1), "mask_id"),
        (dict(stop_at_eos=True), "needs eos_id"),
        (dict(eos_id=MASK), "eos_id must differ from mask_id"),
        (dict(eos_id=-2), "eos_id"),
        (dict(stop_at_eos=1, eos_id=EOS), "stop_at_eos must be a bool"),
        (dict(generator=0), "generator"),
        (dict(callback="print"), "callback"),
    ],
)
def test_bad_arguments_raise(overrides, match) -> None:
    with pytest.raises(ValueError, match=match):
        generate(TableModel(), _prompt(), **{**GOOD, **overrides})


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        (torch.tensor([1, 2, 3]), "2 dimensions"),
        (torch.ones(1, 2, 3, dtype=torch.long), "2 dimensions"),
        (torch.ones(2, 3), "integer tensor"),
        (torch.ones(2, 3, dtype=torch.bool), "integer tensor"),
        (torch.zeros(0, 3, dtype=torch.long), "at least one row"),
        (torch.tensor([[1, 2], [3, MASK]]), "must not contain mask_id=10, found at row 1, position 1"),
        ("abc", "non-empty list of token-id lists"),
        ([], "non-empty list of token-id lists"),
        ([[1, 2.5]], "prompt row 0 must be a list of int token ids"),
        ([torch.ones(2, 2, dtype=torch.long)], "prompt row 0 must be a 1-D integer tensor"),
    ],
)
def test_bad_prompt_raises(prompt, match) -> None:
    with pytest.raises(ValueError, match=match):
        generate(TableModel(), prompt, **GOOD)


@pytest.mark.parametrize(
    "model",
    [lambda x, r: torch.zeros(x.shape[0], VOCAB), lambda x, r: torch.zeros(*x.shape, VOCAB, dtype=torch.long)],
)
def test_bad_model_output_raises(model) -> None:
    with pytest.raises(ValueError, match="model must return"):
        generate(model, _prompt(), **GOOD)
