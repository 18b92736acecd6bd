"""`StepInfo.routing`: the experts each step's forward used for its current decoding block, the block's
coreset and votes under block routing, on tiny real models; checked against direct forwards and the stats."""

import pytest
import torch

from dlmoe.config import BlockRoutingConfig, ModelConfig, MoEConfig, RouterConfig
from dlmoe.model import DiffusionTransformer
from dlmoe.sampling import SamplerConfig, StepInfo, StepRouting, generate

MASK, E, K, LAYERS = 63, 8, 2, 2
PROMPTS = [[1, 2, 3, 4, 5], [6, 7]]  # left-padded: row 1 has 3 padding columns
GEN, BLOCK, STEPS = 8, 4, 8
BLOCK_ROUTING = BlockRoutingConfig(top_p=0.6, guard=1)


def model(kind: str = "token_choice", moe: bool = True) -> DiffusionTransformer:
    torch.manual_seed(0)
    router = RouterConfig(kind=kind, num_experts=E, num_experts_per_tok=K)
    config = ModelConfig(
        vocab_size=64, dim=32, num_layers=LAYERS, num_heads=4, max_seq_len=64, dense_hidden=48,
        moe=MoEConfig(router=router, expert_hidden=16, num_shared_experts=1) if moe else None,
        mask_id=MASK, eos_id=62, init_std=0.2,
    )  # fmt: skip
    return DiffusionTransformer(config).eval()


def steps_of(m, **options) -> tuple[list[StepInfo], object]:
    infos: list[StepInfo] = []
    sampler = SamplerConfig(**(dict(gen_length=GEN, block_length=BLOCK, steps=STEPS) | options))
    result = generate(m, PROMPTS, sampler, callback=infos.append)
    return infos, result


def reference_load(m, canvas_BL: torch.Tensor, valid_BL: torch.Tensor, span: range) -> torch.Tensor:
    """[B, layers, E] int64 from a fresh forward of the whole canvas, counted slot by slot in Python."""
    out = m(canvas_BL, attention_mask=valid_BL.long())
    batch, length = canvas_BL.shape
    load = torch.zeros(batch, len(out.dispatches), E, dtype=torch.int64)
    for layer, d in enumerate(out.dispatches):
        for token, expert in zip(d.token_index.tolist(), d.expert_index.tolist(), strict=True):
            row, column = divmod(token, length)
            if column in span and bool(valid_BL[row, column]):
                load[row, layer, expert] += 1
    return load


def test_token_choice_load_counts_the_blocks_slots_and_matches_a_direct_forward() -> None:
    m = model()
    infos, result = steps_of(m)
    assert len(infos) == STEPS
    before = infos[0].tokens.clone()
    before[infos[0].committed] = MASK  # the canvas before the first step
    for info in infos:
        routing = info.routing
        assert isinstance(routing, StepRouting) and routing.block == info.block
        assert (routing.num_layers, routing.num_experts, routing.num_rows) == (LAYERS, E, 2)
        load = routing.expert_load()
        assert load.shape == (2, LAYERS, E) and load.dtype == torch.int64
        assert bool((load.sum(-1) == BLOCK * K).all())  # the block is all real tokens; dropless top-k
        assert routing.coreset() is None and routing.votes() is None
        start = result.prompt_length + BLOCK * info.block
        expected = reference_load(m, before, result.attention_mask, range(start, start + BLOCK))
        assert torch.equal(load, expected), info.step
        before = info.tokens.clone()


@pytest.mark.parametrize("kind", ["token_choice", "expert_choice"])
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_block_routing_load_lies_in_the_coreset_which_lies_in_the_votes(kind, cache) -> None:
    infos, _ = steps_of(model(kind), block_routing=BLOCK_ROUTING, cache=cache)
    for info in infos:
        routing = info.routing
        load, coreset, votes = routing.expert_load(), routing.coreset(), routing.votes()
        assert coreset.shape == votes.shape == load.shape == (2, LAYERS, E)
        assert coreset.dtype == torch.bool and votes.dtype == torch.float32
        assert bool(coreset[load > 0].all())
        assert bool((votes[coreset] > 0).all())  # guard=1: only voted experts enter the coreset
        assert torch.allclose(votes.sum(-1), torch.ones(2, LAYERS))
        assert bool(((load > 0).sum(-1) <= coreset.sum(-1)).all())
        if kind == "token_choice":
            assert bool((load.sum(-1) == BLOCK * K).all())


def test_block_routing_narrows_the_experts_below_what_the_votes_ask_for() -> None:
    infos, _ = steps_of(model(), block_routing=BlockRoutingConfig(top_p=1e-6, guard=1))
    used = torch.stack([(info.routing.expert_load() > 0).sum(-1) for info in infos])
    voted = torch.stack([(info.routing.votes() > 0).sum(-1) for info in infos])
    assert bool((used == 1).all())  # top-1 coreset: every block token goes to the one expert
    assert bool((voted > 1).any())


@pytest.mark.parametrize("options", [dict(cache="dual"), dict(cfg_scale=1.5), dict(cfg_scale=1.5, cache="dual")])
def test_caches_and_cfg_report_the_conditional_rows_of_the_fed_block(options) -> None:
    infos, _ = steps_of(model(), **options)
    for info in infos:
        routing = info.routing
        assert routing.dispatches[0].batch_shape[0] == (4 if "cfg_scale" in options else 2)
        load = routing.expert_load()
        assert load.shape == (2, LAYERS, E)
        assert bool((load.sum(-1) == BLOCK * K).all())
    if options.get("cache") == "dual":  # after a block's first step only the block is fed
        later = [info.routing for info in infos if info.block_step > 0]
        assert all(r.dispatches[0].batch_shape[1] == BLOCK and r.block_offset == 0 for r in later)


def test_a_plain_callable_or_a_dense_model_gives_no_routing() -> None:
    plain = lambda x, ratio: torch.randn(*x.shape, 64, generator=torch.Generator().manual_seed(0))
    infos: list[StepInfo] = []
    generate(plain, [[1, 2]], gen_length=4, block_length=4, steps=2, mask_id=MASK, callback=infos.append)
    assert infos and all(info.routing is None for info in infos)
    infos, _ = steps_of(model(moe=False))
    assert infos and all(info.routing is None for info in infos)


def test_routing_changes_no_output() -> None:
    m = model()
    with_callback, result = steps_of(m, block_routing=BLOCK_ROUTING, cache="dual")
    plain = generate(m, PROMPTS, SamplerConfig(gen_length=GEN, block_length=BLOCK, steps=STEPS,
                                               block_routing=BLOCK_ROUTING, cache="dual"))  # fmt: skip
    assert torch.equal(result.tokens, plain.tokens)


@pytest.mark.parametrize("block_routing", [None, BLOCK_ROUTING])
def test_unique_experts_from_the_load_equal_the_generation_stats(block_routing) -> None:
    infos, result = steps_of(model(), block_routing=block_routing)
    used = torch.stack([(info.routing.expert_load() > 0).sum(-1) for info in infos]).double()  # [steps, B, layers]
    by_layer = used.sum((0, 1)) / (used.shape[0] * used.shape[1])
    assert by_layer.tolist() == pytest.approx(result.stats.unique_experts_by_layer, rel=1e-12)
    assert by_layer.mean().item() == pytest.approx(result.stats.unique_experts, rel=1e-12)


def test_votes_mark_the_experts_token_routing_uses_for_the_block() -> None:
    """At the first step both runs feed the same canvas, so the first MoE layer sees the same tokens:
    its voted experts are exactly the experts plain token routing used for the block."""
    m = model()
    routed, _ = steps_of(m, block_routing=BLOCK_ROUTING)
    plain, _ = steps_of(m)
    voted = routed[0].routing.votes()[:, 0] > 0
    assert torch.equal(voted, plain[0].routing.expert_load()[:, 0] > 0)
    assert bool((routed[0].routing.coreset()[:, 0].sum(-1) < voted.sum(-1)).any())  # top_p cut some


def test_dispatch_expert_load_counts_the_selected_tokens_slots_per_row() -> None:
    m = model()
    tokens = torch.tensor([[1, 2, 3, MASK, MASK], [0, 6, 7, MASK, MASK]])
    valid = torch.tensor([[True] * 5, [False] + [True] * 4])
    d = m(tokens, attention_mask=valid.long()).dispatches[0]
    select = torch.tensor([[False, True, False, True, True], [True, False, True, True, False]])
    load = d.expert_load(select)
    expected = torch.zeros(2, E, dtype=torch.int64)
    for token, expert in zip(d.token_index.tolist(), d.expert_index.tolist(), strict=True):
        expected[token // 5, expert] += int(select.view(-1)[token])
    assert torch.equal(load, expected) and int(load.sum()) == K * 5  # padding has no slot
    assert torch.equal(d.unique_experts(select), (load > 0).sum(-1))
