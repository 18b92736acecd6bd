"""Fast sampling on real dlmoe models: left-padded batches, KV caches, threshold decoding, CFG,
dMoE block routing and expert-choice capacity policies at inference."""

import pytest
import torch

import dlmoe
from dlmoe.config import BlockRoutingConfig, ModelConfig, MoEConfig, RouterConfig
from dlmoe.model import DiffusionTransformer
from dlmoe.routing.schedules import dynamic_k
from dlmoe.sampling import CapacityPolicy, StepInfo, generate

MASK, EOS, E = 63, 62, 8
PROMPTS = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10, 11, 12, 13, 14], [15]]


def model(
    kind: str = "token_choice", attention: str = "bidirectional", seed: int = 0, **router
) -> DiffusionTransformer:
    torch.manual_seed(seed)
    rc = RouterConfig(kind=kind, num_experts=E, num_experts_per_tok=2, **router)
    config = ModelConfig(
        vocab_size=64, dim=32, num_layers=2, num_heads=4, max_seq_len=64, dense_hidden=48,
        moe=MoEConfig(router=rc, expert_hidden=16, num_shared_experts=1), mask_id=MASK, eos_id=EOS,
        attention=attention, attention_block_size=4, init_std=0.2,
    )  # fmt: skip
    return DiffusionTransformer(config).eval()


def run(m, prompts=PROMPTS, **kwargs):
    options = dict(gen_length=8, block_length=4, steps=8) | kwargs
    return generate(m, prompts, **options)


def assert_batch_equals_single_rows(m, **kwargs) -> None:
    batched = run(m, **kwargs)
    for b, prompt in enumerate(PROMPTS):
        single = run(m, [prompt], **kwargs)
        assert torch.equal(batched.generated[b], single.generated[0]), (b, kwargs)
    assert not (batched.generated == MASK).any()
    for b, prompt in enumerate(PROMPTS):  # the prompt is kept, right-aligned before the generation
        assert batched.tokens[b, batched.prompt_length - len(prompt) : batched.prompt_length].tolist() == prompt


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize(
    "kind,router",
    [("token_choice", {}), ("token_choice", {"score": "sigmoid", "expert_bias": True}), ("expert_choice", {})],
)
def test_padding_never_changes_a_rows_result(cache, kind, router) -> None:
    assert_batch_equals_single_rows(model(kind, **router), cache=cache)


@pytest.mark.parametrize("kind", ["token_choice", "expert_choice"])
def test_padding_invariance_with_block_routing_threshold_and_cfg(kind) -> None:
    m = model(kind)
    block = BlockRoutingConfig(top_p=0.5, guard=3)
    assert_batch_equals_single_rows(m, block_routing=block, cache="dual")
    assert_batch_equals_single_rows(m, threshold=0.3, steps=None)
    assert_batch_equals_single_rows(m, cfg_scale=1.5, cache="prefix")


@pytest.mark.parametrize("routing", [None, BlockRoutingConfig(top_p=0.4, guard=3)])
def test_block_causal_caches_equal_no_cache_and_feed_fewer_tokens(routing) -> None:
    m = model(attention="block_causal")
    plain = run(m, block_routing=routing)
    for cache in ("prefix", "dual", "exact"):
        cached = run(m, cache=cache, block_routing=routing)
        assert torch.equal(cached.tokens, plain.tokens), cache
        assert cached.num_forwards == plain.num_forwards == 8  # exact: cache filling rides on block starts
        assert cached.stats.tokens_fed < plain.stats.tokens_fed
    assert run(m, cache="exact").stats.active_flops < run(m, cache="dual").stats.active_flops


def test_threshold_commits_everything_above_tau_and_at_least_one() -> None:
    m = model(seed=3)
    infos: list[StepInfo] = []
    tau = 0.2
    result = generate(m, PROMPTS[:2], gen_length=8, block_length=4, threshold=tau, callback=infos.append)
    assert not (result.generated == MASK).any()
    # replay: recompute each step's confidences from the canvas before it
    before = infos[0].tokens.clone()
    before[infos[0].committed] = MASK
    for info in infos:
        start = result.prompt_length + 4 * info.block
        valid = result.attention_mask
        logits = m(before, attention_mask=valid.long()).logits[:, start : start + 4]
        probs = logits.float().softmax(-1)
        probs[..., MASK] = 0
        confidence = probs.max(-1).values
        masked = before[:, start : start + 4] == MASK
        committed = info.committed[:, start : start + 4]
        for b in range(2):
            if masked[b].any():
                above = masked[b] & (confidence[b] >= tau)
                assert bool((committed[b] | ~above).all())  # every candidate above τ is committed
                assert int(committed[b].sum()) == max(int(above.sum()), 1)
        before = info.tokens.clone()
    assert result.steps_per_block is None and result.num_forwards == len(infos)


def test_block_routing_with_full_coreset_is_token_routing() -> None:
    m = model()
    full = BlockRoutingConfig(top_p=1.0, guard=E)
    assert torch.equal(run(m, block_routing=full).tokens, run(m).tokens)


@pytest.mark.parametrize("kind", ["token_choice", "expert_choice"])
def test_block_routing_uses_at_most_the_guard_when_top_p_is_tiny(kind) -> None:
    m = model(kind)
    routed = run(m, block_routing=BlockRoutingConfig(top_p=1e-6, guard=3), cache="dual")
    plain = run(m, cache="dual")
    assert routed.stats.unique_experts <= 3 + 1e-9
    assert routed.stats.unique_experts < plain.stats.unique_experts
    assert len(routed.stats.unique_experts_by_layer) == 2


def test_expert_choice_capacity_policy_sets_k_per_step() -> None:
    m = model("expert_choice")
    policy = CapacityPolicy("linear", k_min=1, k_max=6)
    seen: list[tuple[int, int]] = []  # (fed length, routed slots) of layer 0, per forward
    handle = m.layers[0].ffn.router.register_forward_hook(
        lambda mod, args, out: seen.append((args[0].shape[1], out.num_slots))
    )
    try:
        generate(m, [PROMPTS[0]], gen_length=8, block_length=4, steps=8, cache="dual", capacity=policy)
    finally:
        handle.remove()
    # replay the remaining-mask fraction before each step: one token committed per step
    remaining = [1 - i / 8 for i in range(8)]
    for (fed, slots), r in zip(seen, remaining, strict=True):
        k = int(dynamic_k(torch.tensor([r]), "linear", 1, 6)[0])
        assert slots == E * max(fed * k // E, 1), (fed, slots, r, k)


def test_top_level_generate_and_stats_fields() -> None:
    assert dlmoe.generate is generate
    result = run(model(), cache="dual")
    stats = result.stats.as_dict()
    for key in ("num_forwards", "unique_experts", "active_flops_per_token", "tokens_per_second", "experts_per_token"):
        assert key in stats
    assert result.stats.experts_per_token == pytest.approx(2.0)  # dropless top-2
    assert 1 <= result.stats.unique_experts <= E


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(threshold=0.0, steps=None), "threshold"),
        (dict(threshold=1.5), "threshold"),
        (dict(cache="exact"), "cache='exact' needs a block-causal model"),
        (dict(cache="paged"), "cache must be one of"),
        (dict(capacity=CapacityPolicy("linear", 1, 4)), "needs an expert-choice model"),
        (dict(block_routing=BlockRoutingConfig(guard=9)), "guard=9 must be <= num_experts=8"),
        (dict(gen_length=64, block_length=4, steps=64), "exceeds the model's max_seq_len=64"),
        (dict(steps=None), "steps is required without a threshold"),
        (dict(cfg_scale=-1.0), "cfg_scale"),
        (dict(block_length=3), "must be a multiple of block_length=3"),
    ],
)
def test_bad_input_raises_before_any_forward(kwargs, match) -> None:
    m = model()
    calls = []
    handle = m.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            run(m, **kwargs)
    finally:
        handle.remove()
    assert not calls


def test_bad_prompts_raise() -> None:
    m = model()
    with pytest.raises(ValueError, match="must not contain mask_id=63, found at row 1"):
        run(m, [[1], [2, MASK]])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size=64\)"):
        run(m, [[1, 99]])
    with pytest.raises(ValueError, match="left padding"):
        generate(
            m, torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1, 0]]), gen_length=4, block_length=4, steps=4
        )
    plain = lambda x, r: torch.zeros(*x.shape, 64)
    with pytest.raises(ValueError, match="need a dlmoe model"):
        generate(plain, [[1]], gen_length=4, block_length=4, steps=4, mask_id=MASK, cache="dual")
    with pytest.raises(ValueError, match="left padding"):
        generate(plain, [[1], [1, 2]], gen_length=4, block_length=4, steps=4, mask_id=MASK)


@pytest.mark.parametrize("kind", ["token_choice", "expert_choice"])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_block_routing_invariants_on_every_forward_of_a_generation(kind, cache) -> None:
    """Every routed slot lies in its decoding block's coreset; coresets hold ≥ guard experts; padding gets no slot."""
    m = model(kind)
    dispatches = []
    handles = [layer.ffn.router.register_forward_hook(lambda mod, a, out: dispatches.append(out)) for layer in m.layers]
    try:
        result = run(m, block_routing=BlockRoutingConfig(top_p=0.3, guard=3), cache=cache)
    finally:
        for handle in handles:
            handle.remove()
    assert len(dispatches) == 2 * result.num_forwards
    for d in dispatches:
        batch, length = d.batch_shape
        row, column = d.token_index // length, d.token_index % length
        block = d.block_index[column]
        assert bool(d.coreset_mask[row, block, d.expert_index].all())
        assert bool((d.coreset_mask.sum(-1) >= 3).all())
        if length == result.tokens.shape[1]:  # a full-canvas forward: left padding is fed, never routed
            assert bool(result.attention_mask[row, column].all())
