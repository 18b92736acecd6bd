"""Token suppression: ids never proposed (LLaDA's `logits_eos_inf`), ids committed last (its
`confidence_eos_eot_inf`), their checks, and the default sampler unchanged bit for bit."""

import pytest
import torch

from dlmoe.sampling import StepInfo, generate, select_commits, suppress_commits, suppress_logits, threshold_commits
from tests.sampling import test_fast_sampling as fast
from tests.sampling.test_llada_loop import EOS, MASK, ScriptedModel, TableModel, _prompt

# ----------------------------------------------------------------------------- default unchanged

# generated tokens of the sampler before suppression existed (same models, prompts and seeds)
BEFORE = {
    "table_greedy": [[8, 1, 4, 3, 0, 1, 0, 6], [8, 1, 4, 3, 0, 1, 0, 6]],
    "table_temp": [[0, 1, 4, 3, 6, 1, 8, 6], [8, 1, 4, 3, 0, 1, 6, 0]],
    "table_random": [[5, 1, 4, 3, 0, 1, 0, 6], [8, 1, 4, 5, 0, 1, 8, 6]],
    "table_threshold": [[8, 1, 4, 3, 0, 1, 0, 6], [8, 1, 4, 3, 0, 1, 0, 6]],
    "tiny_temp": [
        [56, 41, 41, 56, 46, 41, 24, 24],
        [41, 51, 39, 37, 39, 39, 11, 0],
        [35, 39, 39, 55, 14, 14, 59, 14],
        [28, 33, 56, 55, 28, 39, 55, 55],
    ],
    "tiny_threshold_ec": [
        [41, 56, 41, 41, 41, 39, 41, 52],
        [39, 41, 55, 55, 14, 59, 59, 39],
        [35, 14, 39, 39, 59, 59, 59, 14],
        [28, 28, 28, 44, 44, 44, 44, 44],
    ],
}


def _table(case: str, **suppress) -> torch.Tensor:
    kw = dict(gen_length=8, block_length=4, mask_id=MASK) | suppress
    options = {
        "table_greedy": dict(steps=8),
        "table_temp": dict(steps=4, temperature=0.9, generator=torch.Generator().manual_seed(3)),
        "table_random": dict(steps=8, remasking="random", temperature=0.5, generator=torch.Generator().manual_seed(5)),
        "table_threshold": dict(threshold=0.3),
    }[case]
    return generate(TableModel(), _prompt(), **kw, **options).generated


def _tiny(case: str, **suppress) -> torch.Tensor:
    if case == "tiny_temp":
        g = torch.Generator().manual_seed(7)
        return fast.run(fast.model(), temperature=0.8, generator=g, cache="dual", **suppress).generated
    return fast.run(fast.model("expert_choice"), threshold=0.3, steps=None, **suppress).generated


@pytest.mark.parametrize("case", list(BEFORE))
def test_default_output_unchanged_bit_for_bit(case: str) -> None:
    run = _table if case.startswith("table") else _tiny
    assert run(case).tolist() == BEFORE[case]
    # empty suppression lists are no suppression
    assert run(case, suppress_tokens=[], suppress_commit_tokens=[]).tolist() == BEFORE[case]


# ----------------------------------------------------------------------------- never proposed


@pytest.mark.parametrize("cache", ["none", "dual"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_suppressed_ids_never_appear_in_the_output(cache: str, temperature: float) -> None:
    banned = [39, 41, 14, 55, 56, 59, 28, fast.EOS]  # the tiny model's favourite tokens
    assert torch.isin(torch.tensor(BEFORE["tiny_temp"]), torch.tensor(banned)).any()  # they appear otherwise
    m = fast.model()
    g = torch.Generator().manual_seed(11)
    for kwargs in (dict(), dict(threshold=0.2, steps=None)):
        result = fast.run(m, cache=cache, temperature=temperature, generator=g, suppress_tokens=banned, **kwargs)
        assert not torch.isin(result.generated, torch.tensor(banned)).any()
        assert not (result.generated == fast.MASK).any()


class Suppressed:
    """The callable `model` with the logits of `ids` at −inf: what `suppress_tokens` must equal."""

    def __init__(self, model, ids: list[int]) -> None:
        self.model, self.ids = model, torch.tensor(ids)

    def __call__(self, x_BL: torch.Tensor, mask_ratio_B: torch.Tensor) -> torch.Tensor:
        return self.model(x_BL, mask_ratio_B).index_fill(-1, self.ids, float("-inf"))


@pytest.mark.parametrize(
    "options",
    [dict(steps=8), dict(steps=4, temperature=0.9), dict(steps=8, remasking="random"), dict(threshold=0.3)],
)
def test_suppress_tokens_equals_a_model_whose_logits_are_minus_inf(options: dict) -> None:
    # LLaDA's logits_eos_inf: the proposal and the confidence both see the −inf logits
    banned = [0, 1, 8]
    kw = dict(gen_length=8, block_length=4, mask_id=MASK) | options
    got = generate(TableModel(), _prompt(), suppress_tokens=banned, generator=torch.Generator().manual_seed(2), **kw)
    want = generate(Suppressed(TableModel(), banned), _prompt(), generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(got.tokens, want.tokens)
    assert not torch.isin(got.generated, torch.tensor(banned)).any()


def test_suppress_logits_keeps_other_logits() -> None:
    logits = torch.randn(2, 3, 6)
    out = suppress_logits(logits, torch.tensor([1, 4]))
    assert bool((out[..., [1, 4]] == float("-inf")).all())
    assert torch.equal(out[..., [0, 2, 3, 5]], logits[..., [0, 2, 3, 5]])


# ----------------------------------------------------------------------------- committed last


def test_select_commits_takes_minus_inf_candidates_last_but_before_non_candidates() -> None:
    confidence = torch.tensor([[float("-inf"), 0.1, 0.5, float("-inf"), 0.9]])
    candidates = torch.tensor([[True, True, True, True, False]])
    ranks = [select_commits(confidence, candidates, torch.tensor([q]))[0].tolist() for q in range(5)]
    assert ranks == [
        [False, False, False, False, False],
        [False, False, True, False, False],
        [False, True, True, False, False],
        [True, True, True, False, False],  # −inf candidates: leftmost first, never the non-candidate
        [True, True, True, True, False],
    ]
    # a threshold never takes a −inf candidate; the minimum quota still may
    assert threshold_commits(confidence, candidates, 0.05, torch.tensor([1]))[0].tolist() == [
        False, True, True, False, False,
    ]  # fmt: skip
    only_inf = torch.tensor([[False, False, False, True, False]])
    assert threshold_commits(confidence, only_inf, 0.05, torch.tensor([1]))[0].tolist() == [
        False, False, False, True, False,
    ]  # fmt: skip


def test_suppress_commits_sets_minus_inf_on_those_proposals_only() -> None:
    confidence = torch.tensor([[0.9, 0.8, 0.7]])
    out = suppress_commits(confidence, torch.tensor([[EOS, 3, 4]]), torch.tensor([EOS, 4]))
    assert out.tolist() == [[float("-inf"), 0.800000011920929, float("-inf")]]


def _commit_order(model, suppress: list[int] | None, **kwargs) -> list[list[int]]:
    infos: list[StepInfo] = []
    generate(
        model, _prompt(batch=1, length=3), gen_length=4, block_length=4, mask_id=MASK, eos_id=EOS,
        suppress_commit_tokens=suppress, callback=infos.append, **kwargs,
    )  # fmt: skip
    return [(info.committed_positions()[0] - 3).tolist() for info in infos]


def test_suppress_commit_tokens_are_committed_last() -> None:
    # generated position 0 proposes EOS with the top confidence, positions 1-3 tokens 1-3 (rising)
    targets = torch.tensor([[0, 0, 0, EOS, 1, 2, 3]])
    model = ScriptedModel(targets, torch.tensor([[0.0, 0.0, 0.0, 5.0, 1.0, 2.0, 3.0]]))
    assert _commit_order(model, None, steps=4) == [[0], [3], [2], [1]]
    assert _commit_order(model, [EOS], steps=4) == [[3], [2], [1], [0]]  # EOS last
    assert _commit_order(model, [EOS], steps=2) == [[2, 3], [0, 1]]  # within a step's quota: others first
    # threshold: everything above τ but the EOS proposal, which waits for a step with nothing else left
    assert _commit_order(model, None, threshold=0.01) == [[0, 1, 2, 3]]
    assert _commit_order(model, [EOS], threshold=0.01) == [[1, 2, 3], [0]]
    # the output is the same tokens, committed in another order (the scripted model ignores context)
    out = generate(model, _prompt(batch=1, length=3), gen_length=4, block_length=4, steps=4, mask_id=MASK,
                   suppress_commit_tokens=[EOS])  # fmt: skip
    assert out.generated[0].tolist() == [EOS, 1, 2, 3]


def _reference_commit_last(model, prompt_P, gen_length, block_length, steps, last: set[int]) -> torch.Tensor:
    """One row, plain Python: greedy proposals; per step the quota's candidates sorted by
    (proposal in `last`, −p, position)."""
    x = prompt_P.tolist() + [MASK] * gen_length
    steps_per_block = steps // (gen_length // block_length)
    for block in range(gen_length // block_length):
        start = len(prompt_P) + block * block_length
        masked_at_open = sum(x[i] == MASK for i in range(start, start + block_length))
        for j in range(steps_per_block):
            quota = -(-(masked_at_open - j) // steps_per_block)
            row = torch.tensor([x])
            probs = torch.softmax(model(row, (row == MASK).float().mean(1))[0].double(), dim=-1)
            candidates = []
            for i in range(start, start + block_length):
                if x[i] == MASK:
                    allowed = probs[i].clone()
                    allowed[MASK] = -1.0
                    token = int(allowed.argmax())
                    candidates.append((token in last, -float(probs[i, token]), i, token))
            for *_, i, token in sorted(candidates)[:quota]:
                x[i] = token
    return torch.tensor(x)


@pytest.mark.parametrize(("gen_length", "block_length", "steps"), [(12, 4, 6), (12, 12, 5), (8, 2, 8)])
def test_suppress_commit_matches_plain_reference(gen_length: int, block_length: int, steps: int) -> None:
    model, last = TableModel(), [0, 1, 4]  # ids the table model proposes often
    for b, prompt in enumerate(_prompt()):
        got = generate(
            model, prompt[None], gen_length=gen_length, block_length=block_length, steps=steps, mask_id=MASK,
            suppress_commit_tokens=last,
        )  # fmt: skip
        want = _reference_commit_last(model, prompt, gen_length, block_length, steps, set(last))
        assert got.tokens[0].tolist() == want.tolist(), b


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(suppress_tokens=[64]), r"suppress_tokens\[0\] must be <= 63, got 64"),
        (dict(suppress_tokens=[3, -1]), r"suppress_tokens\[1\] must be >= 0, got -1"),
        (dict(suppress_tokens=[1.0]), r"suppress_tokens\[0\] must be an int, got 1.0"),
        (dict(suppress_tokens=[True]), r"suppress_tokens\[0\] must be an int, got True"),
        (dict(suppress_tokens="eos"), "suppress_tokens must be a list of int token ids, got 'eos'"),
        (dict(suppress_tokens=5), "suppress_tokens must be a list of int token ids, got 5"),
        (dict(suppress_tokens=[fast.MASK]), "must not hold mask_id=63"),
        (dict(suppress_commit_tokens=[fast.MASK]), "suppress_commit_tokens must not hold mask_id=63"),
        (dict(suppress_commit_tokens=[70]), r"suppress_commit_tokens\[0\] must be <= 63"),
        (dict(suppress_tokens=[5, 6], suppress_commit_tokens=[6]), r"token ids \[6\] are in both"),
        (dict(suppress_tokens=list(range(63))), "suppress_tokens leaves no token to propose"),
    ],
)
def test_invalid_ids_are_refused_before_any_forward(kwargs: dict, match: str) -> None:
    m = fast.model()
    calls = []
    handle = m.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            fast.run(m, **kwargs)
    finally:
        handle.remove()
    assert not calls


def test_ids_outside_a_callables_vocabulary_are_refused_at_its_first_forward() -> None:
    model = TableModel()
    kw = dict(gen_length=8, block_length=4, steps=4, mask_id=MASK)
    with pytest.raises(ValueError, match=r"suppress_tokens\[0\] must be <= 10, got 11"):
        generate(model, _prompt(), suppress_tokens=[11], **kw)
    assert len(model.calls) == 1
    with pytest.raises(ValueError, match="leaves no token to propose"):
        generate(TableModel(), _prompt(), suppress_tokens=list(range(10)), **kw)
    with pytest.raises(ValueError, match="must not hold mask_id=10"):
        generate(TableModel(), _prompt(), suppress_commit_tokens=[MASK], **kw)
    # a tensor of ids works as a list
    got = generate(TableModel(), _prompt(), suppress_tokens=torch.tensor([0, 1]), **kw)
    assert torch.equal(got.tokens, generate(TableModel(), _prompt(), suppress_tokens=[1, 0, 1], **kw).tokens)
