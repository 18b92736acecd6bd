"""Router modules: fp32 logits, loss-free expert bias updates, capacity schedule from the mask ratio."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dlmoe.config import BlockRoutingConfig, RouterConfig
from dlmoe.routing import ExpertChoiceRouter, TokenChoiceRouter, build_router, update_expert_biases
from dlmoe.routing.schedules import dynamic_k

DIM = 16


def make_x(batch: int, length: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, length, DIM, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize(
    "cfg",
    [
        RouterConfig(kind="token_choice", num_experts=8, num_experts_per_tok=2),
        RouterConfig(kind="token_choice", num_experts=8, num_experts_per_tok=2, block=BlockRoutingConfig(guard=4)),
        RouterConfig(kind="expert_choice", num_experts=8, num_experts_per_tok=2),
    ],
    ids=["token_choice", "block", "expert_choice"],
)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_logits_float32_under_autocast(cfg: RouterConfig, x_dtype: torch.dtype) -> None:
    router = build_router(cfg, DIM)
    assert isinstance(router, TokenChoiceRouter if cfg.kind == "token_choice" else ExpertChoiceRouter)
    x = make_x(2, 6, seed=0, dtype=x_dtype)
    ref = x.float() @ router.weight.detach().float().T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = router.logits(x)
        d = router(x)
        plain_bf16 = torch.nn.functional.linear(x.float(), router.weight)  # what autocast would do
    assert plain_bf16.dtype == torch.bfloat16  # autocast is really on
    assert logits.dtype == torch.float32
    assert logits.shape == (2, 6, 8)
    torch.testing.assert_close(logits, ref, rtol=1e-6, atol=1e-6)
    assert d.gate.dtype == torch.float32


def test_logits_gradient_reaches_weight() -> None:
    router = TokenChoiceRouter(RouterConfig(num_experts=4, num_experts_per_tok=2), DIM)
    router(make_x(2, 3, seed=1)).gate.sum().backward()  # gates renormalised: sum is constant
    assert router.weight.grad is not None
    router.weight.grad = None
    (router(make_x(2, 3, seed=1)).gate ** 2).sum().backward()
    assert router.weight.grad is not None and float(router.weight.grad.abs().sum()) > 0


@given(st.integers(2, 10), st.integers(1, 3), st.integers(1, 3), st.integers(1, 12), st.integers(0, 2**31 - 1))
def test_expert_bias_update(num_experts: int, k_raw: int, batch: int, length: int, seed: int) -> None:
    k = min(k_raw, num_experts)
    rate = 0.01
    cfg = RouterConfig(num_experts=num_experts, num_experts_per_tok=k, expert_bias=True, bias_update_rate=rate)
    router = TokenChoiceRouter(cfg, DIM)
    router.train()
    x1, x2 = make_x(batch, length, seed), make_x(batch, length, seed + 1)
    d1, d2 = router(x1), router(x2)  # two micro-batches accumulate
    counts = (d1.counts + d2.counts).float()
    torch.testing.assert_close(router.tokens_per_expert, counts)
    router.update_expert_bias()
    expected = rate * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(router.expert_bias, expected)
    under, over = counts < counts.mean(), counts > counts.mean()
    assert bool((router.expert_bias[under] == rate).all())
    assert bool((router.expert_bias[over] == -rate).all())
    assert bool((router.expert_bias[~under & ~over] == 0).all())
    assert bool((router.tokens_per_expert == 0).all())


def test_expert_bias_counts_before_drop_and_not_in_eval() -> None:
    cfg = RouterConfig(num_experts=4, num_experts_per_tok=1, expert_bias=True, capacity_factor=1.0)
    router = TokenChoiceRouter(cfg, DIM)
    with torch.no_grad():
        router.weight.zero_()
        router.weight[0, 0] = 1.0
    x = torch.zeros(1, 8, DIM)
    x[..., 0] = 5.0  # every token wants expert 0; capacity ceil(8·1/4·1.0) = 2 keeps only two of them
    router.train()
    d = router(x)
    assert d.counts.tolist() == [2, 0, 0, 0]
    assert router.tokens_per_expert.tolist() == [8.0, 0.0, 0.0, 0.0]
    router.eval()
    router(x)
    assert router.tokens_per_expert.tolist() == [8.0, 0.0, 0.0, 0.0]
    router.update_expert_bias()
    torch.testing.assert_close(router.expert_bias, torch.tensor([-1e-3, 1e-3, 1e-3, 1e-3]))


def test_expert_bias_steers_selection() -> None:
    router = TokenChoiceRouter(RouterConfig(num_experts=4, num_experts_per_tok=1, expert_bias=True), DIM)
    router.train()
    x = make_x(1, 16, seed=3)
    before = router(x)
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    after = router(x)
    assert after.expert_index.tolist() == [2] * 16
    assert set(before.expert_index.tolist()) != {2}
    probs = torch.softmax(router.logits(x).reshape(-1, 4), -1)[:, 2]
    torch.testing.assert_close(after.gate, torch.ones(16))  # renormalised k=1 gate
    assert not torch.allclose(probs, torch.ones(16))


def test_reduce_counts_hook() -> None:
    router = TokenChoiceRouter(RouterConfig(num_experts=4, num_experts_per_tok=2, expert_bias=True), DIM)
    router.train()
    d = router(make_x(2, 5, seed=4))
    seen: list[torch.Tensor] = []

    def reduce(counts: torch.Tensor) -> torch.Tensor:
        seen.append(counts.clone())
        return torch.tensor([1.0, 5.0, 3.0, 3.0])  # pretend the other ranks changed the picture

    router.update_expert_bias(reduce_counts=reduce)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], d.counts.float())
    torch.testing.assert_close(router.expert_bias, torch.tensor([1e-3, -1e-3, 0.0, 0.0]))
    assert bool((router.tokens_per_expert == 0).all())


def test_update_expert_biases_walks_submodules() -> None:
    cfg = RouterConfig(num_experts=4, num_experts_per_tok=1, expert_bias=True, bias_update_rate=0.5)
    r1, r2 = TokenChoiceRouter(cfg, DIM), TokenChoiceRouter(cfg, DIM)
    no_bias = TokenChoiceRouter(RouterConfig(num_experts=4, num_experts_per_tok=1), DIM)
    ec = ExpertChoiceRouter(RouterConfig(kind="expert_choice", num_experts=4, num_experts_per_tok=1), DIM)
    model = nn.ModuleDict({"a": nn.Sequential(nn.Linear(DIM, DIM), r1), "b": nn.ModuleList([r2, no_bias, ec])})
    model.train()
    with torch.no_grad():
        r1.tokens_per_expert.copy_(torch.tensor([4.0, 0.0, 0.0, 0.0]))
        r2.tokens_per_expert.copy_(torch.tensor([0.0, 0.0, 3.0, 1.0]))
    calls: list[int] = []
    update_expert_biases(model, reduce_counts=lambda c: calls.append(1) or c)
    assert len(calls) == 2
    torch.testing.assert_close(r1.expert_bias, torch.tensor([-0.5, 0.5, 0.5, 0.5]))
    torch.testing.assert_close(r2.expert_bias, torch.tensor([0.5, 0.5, -0.5, 0.0]))
    assert float(r1.tokens_per_expert.sum()) == 0.0 and float(r2.tokens_per_expert.sum()) == 0.0
    assert no_bias.expert_bias is None


@given(
    st.integers(1, 4),
    st.integers(1, 24),
    st.sampled_from(["linear", "linear_reverse", "cosine", "gaussian", "bell", "constant"]),
    st.sampled_from(["sequence", "batch"]),
    st.data(),
)
def test_ec_router_capacity_from_mask_ratio(
    batch: int, length: int, schedule: str, pool: str, data: st.DataObject
) -> None:
    num_experts = data.draw(st.integers(1, 12))
    k_min = data.draw(st.integers(1, num_experts))
    k_max = data.draw(st.integers(k_min, num_experts))
    cfg = RouterConfig(
        kind="expert_choice",
        num_experts=num_experts,
        num_experts_per_tok=k_min,
        capacity_schedule=schedule,
        k_min=k_min,
        k_max=k_max,
        pool=pool,
    )
    router = ExpertChoiceRouter(cfg, DIM)
    r = torch.tensor(data.draw(st.lists(st.floats(0.0, 1.0), min_size=batch, max_size=batch)))
    k_b = dynamic_k(r, schedule, k_min, k_max)
    assert torch.equal(router.experts_per_token(r, batch), k_b)
    d = router(make_x(batch, length, data.draw(st.integers(0, 2**31 - 1))), mask_ratio=r)
    if pool == "sequence":
        per_expert = sum(max(length * int(kb) // num_experts, 1) for kb in k_b)
    else:
        per_expert = max(length * int(k_b.sum()) // num_experts, 1)
    assert d.counts.tolist() == [per_expert] * num_experts
    if pool == "sequence":  # each sequence b contributes its own C_b to every expert
        seq = d.token_index // length
        for e in range(num_experts):
            got = torch.bincount(seq[d.expert_index == e], minlength=batch).tolist()
            assert got == [max(length * int(kb) // num_experts, 1) for kb in k_b]


def test_ec_router_static_k_ignores_mask_ratio() -> None:
    router = ExpertChoiceRouter(RouterConfig(kind="expert_choice", num_experts=4, num_experts_per_tok=2), DIM)
    x = make_x(2, 8, seed=5)
    a, b = router(x), router(x, mask_ratio=torch.tensor([0.1, 0.9]))
    assert a.counts.tolist() == [8, 8, 8, 8] == b.counts.tolist()
    assert torch.equal(a.token_index, b.token_index)


def test_ec_router_schedule_needs_mask_ratio() -> None:
    cfg = RouterConfig(kind="expert_choice", num_experts=4, capacity_schedule="linear", k_min=1, k_max=4)
    router = ExpertChoiceRouter(cfg, DIM)
    with pytest.raises(ValueError, match="mask_ratio"):
        router(make_x(2, 8, seed=6))


def test_z_and_aux_loss_only_in_training() -> None:
    cfg = RouterConfig(num_experts=4, num_experts_per_tok=2, aux_loss_coef=0.01, z_loss_coef=1e-3)
    router = TokenChoiceRouter(cfg, DIM)
    x = make_x(2, 8, seed=7)
    router.train()
    assert float(router(x).aux_loss.detach()) > 0
    router.eval()
    assert float(router(x).aux_loss.detach()) == 0.0
    ec = ExpertChoiceRouter(RouterConfig(kind="expert_choice", num_experts=4, z_loss_coef=1e-3), DIM)
    ec.train()
    assert float(ec(x).aux_loss.detach()) > 0
    ec.eval()
    assert float(ec(x).aux_loss.detach()) == 0.0
