"""MoELayer: router → dispatch → experts → combine (+ shared experts) against a brute-force reference.

The reference recomputes, token by token and without any src helper, the router logits, the gates
(from the routing rule of each router) and every chosen expert's SwiGLU, so outputs *and* gradients
(input, router weight, experts, shared experts) are checked. The discrete routing decisions are
read from the layer's `Dispatch` (index tensors, no gradient) and verified against the routing
rule separately.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dlmoe.config import BlockRoutingConfig, MoEConfig, RouterConfig
from dlmoe.moe.experts import BACKENDS
from dlmoe.moe.layer import MoELayer, MoEOutput
from dlmoe.routing.dispatch import Dispatch

DIM, HIDDEN, NUM_EXPERTS, BATCH, LENGTH = 16, 8, 8, 2, 8
FP32_RTOL = 1e-5
BF16_RTOL = 3e-2

CASES = {
    "ec": dict(kind="expert_choice", num_experts=NUM_EXPERTS, num_experts_per_tok=2),
    "ec_schedule": dict(
        kind="expert_choice",
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        capacity_schedule="linear",
        k_min=1,
        k_max=NUM_EXPERTS,
    ),
    "tc_dropless": dict(kind="token_choice", num_experts=NUM_EXPERTS, num_experts_per_tok=2, capacity_factor=None),
    "tc_capacity": dict(kind="token_choice", num_experts=NUM_EXPERTS, num_experts_per_tok=2, capacity_factor=0.75),
    "tc_block": dict(
        kind="token_choice",
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=2,
        block=BlockRoutingConfig(block_size=4, top_p=0.6, guard=3),
    ),
}
MASK_RATIO = torch.tensor([0.2, 0.9])  # ec_schedule: k = round(1 + 7 r) = [2, 7]


# ---------------------------------------------------------------------------------------------
# helpers


def make_layer(case: str, backend: str = "auto", num_shared: int = 0, **router_overrides: object) -> MoELayer:
    router = RouterConfig(**(CASES[case] | router_overrides))
    config = MoEConfig(router=router, expert_hidden=HIDDEN, num_shared_experts=num_shared, backend=backend)
    layer = MoELayer(config, DIM)
    with torch.no_grad():  # O(1) activations and well-separated router logits
        layer.router.weight.normal_(std=1.0 / math.sqrt(DIM))
        layer.experts.gate_up_proj.normal_(std=1.0 / math.sqrt(DIM))
        layer.experts.down_proj.normal_(std=1.0 / math.sqrt(HIDDEN))
        if layer.shared_experts is not None:
            layer.shared_experts.gate_up_proj.weight.normal_(std=1.0 / math.sqrt(DIM))
            layer.shared_experts.down_proj.weight.normal_(std=1.0 / math.sqrt(layer.config.shared_width))
    return layer


def mask_ratio_for(case: str) -> torch.Tensor | None:
    return MASK_RATIO.clone() if case == "ec_schedule" else None


def chosen_experts(dispatch: Dispatch) -> list[list[int]]:
    """Per token, the experts that process it (sorted)."""
    per_token: list[list[int]] = [[] for _ in range(dispatch.num_tokens)]
    for t, e in zip(dispatch.token_index.tolist(), dispatch.expert_index.tolist(), strict=True):
        per_token[t].append(e)
    return [sorted(es) for es in per_token]


def ref_swiglu(x_D: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    hidden = w_down.shape[1]
    h = w_gate_up @ x_D
    return w_down @ (F.silu(h[:hidden]) * h[hidden:])


def ref_gates(layer: MoELayer, logits_NE: torch.Tensor, chosen: list[list[int]]) -> list[dict[int, torch.Tensor]]:
    """Gate of each (token, chosen expert), recomputed from the routing rule (differentiable)."""
    c = layer.config.router
    gates: list[dict[int, torch.Tensor]] = []
    for t, experts in enumerate(chosen):
        row = logits_NE[t]
        if not experts:
            gates.append({})
            continue
        if c.kind == "expert_choice":  # "restricted": softmax over the experts that chose t
            w = torch.softmax(row[experts], dim=0)
            gates.append({e: w[i] for i, e in enumerate(experts)})
            continue
        p = torch.softmax(row, dim=0) if c.score == "softmax" else torch.sigmoid(row)
        # TC renormalises over the token's top-k *before* any capacity drop; block routing over
        # the experts it kept
        topk = row.detach().topk(c.num_experts_per_tok).indices.tolist() if c.block is None else experts
        denom = p[topk].sum() if c.renormalize else 1.0
        gates.append({e: p[e] / denom * c.routed_scaling_factor for e in experts})
    return gates


def reference_forward(layer: MoELayer, x_BLD: torch.Tensor, dispatch: Dispatch) -> torch.Tensor:
    batch, length, dim = x_BLD.shape
    x_ND = x_BLD.reshape(-1, dim)
    logits_NE = x_ND.float() @ layer.router.weight.float().T
    chosen = chosen_experts(dispatch)
    gates = ref_gates(layer, logits_NE, chosen)
    w_gu, w_d = layer.experts.gate_up_proj, layer.experts.down_proj
    rows = []
    for t in range(x_ND.shape[0]):
        acc = x_ND.new_zeros(dim)
        for e, g in gates[t].items():
            acc = acc + g * ref_swiglu(x_ND[t], w_gu[e], w_d[e])
        if layer.shared_experts is not None:
            sh = layer.shared_experts
            acc = acc + ref_swiglu(x_ND[t], sh.gate_up_proj.weight, sh.down_proj.weight)
        rows.append(acc)
    return torch.stack(rows).view(batch, length, dim)


def check_routing_rule(layer: MoELayer, x_BLD: torch.Tensor, dispatch: Dispatch, mask_ratio: torch.Tensor | None):
    """The discrete decision in `dispatch` follows the configured routing rule."""
    c = layer.config.router
    batch, length, _ = x_BLD.shape
    n, k, num_e = batch * length, c.num_experts_per_tok, c.num_experts
    logits_NE = (x_BLD.reshape(n, -1).double() @ layer.router.weight.double().T).detach()
    chosen = chosen_experts(dispatch)
    # Dispatch invariants: slots sorted by expert, counts consistent
    assert torch.all(dispatch.expert_index[1:] >= dispatch.expert_index[:-1])
    assert torch.equal(dispatch.counts, torch.bincount(dispatch.expert_index, minlength=num_e))
    assert dispatch.num_tokens == n and dispatch.batch_shape == (batch, length)
    if c.kind == "expert_choice":
        if mask_ratio is None:
            k_b = [k] * batch
        else:
            r = mask_ratio.double().tolist()
            k_b = [round(c.k_min + (c.k_max - c.k_min) * rb) for rb in r]
        cap_b = [max(length * kb // num_e, 1) for kb in k_b]
        assert dispatch.equal_counts
        assert dispatch.counts.tolist() == [sum(cap_b)] * num_e
        for e in range(num_e):
            mine = dispatch.token_index[dispatch.expert_index == e]
            for b in range(batch):
                got = sorted(t for t in mine.tolist() if t // length == b)
                top = logits_NE[b * length : (b + 1) * length, e].topk(cap_b[b]).indices + b * length
                want = sorted(top.tolist())
                assert got == want, (e, b)
        return
    topk = [sorted(logits_NE[t].topk(k).indices.tolist()) for t in range(n)]
    if c.block is not None:
        coreset = dispatch.coreset_mask
        scores = torch.softmax(logits_NE, dim=-1)
        for t in range(n):
            b, blk = divmod(t, length)
            allowed = coreset[b, blk // c.block.block_size].nonzero().flatten().tolist()
            assert len(allowed) >= c.block.guard
            want = sorted(allowed[i] for i in scores[t, allowed].topk(min(k, len(allowed))).indices.tolist())
            assert chosen[t] == want, t
    elif c.capacity_factor is None:
        assert chosen == topk
        assert dispatch.num_slots == n * k
    else:
        capacity = math.ceil(n * k / num_e * c.capacity_factor)
        assert all(set(ch) <= set(tk) for ch, tk in zip(chosen, topk, strict=True))
        assert int(dispatch.counts.max()) <= capacity
        assert dispatch.num_slots < n * k, "this case is meant to drop slots"
        gate_of = torch.softmax(logits_NE, -1)  # renormalisation is per token, so compare renormalised gates
        norm = torch.stack([gate_of[t, topk[t]].sum() for t in range(n)])
        for e in range(num_e):
            kept = [gate_of[t, e] / norm[t] for t in range(n) if e in chosen[t]]
            dropped = [gate_of[t, e] / norm[t] for t in range(n) if e in topk[t] and e not in chosen[t]]
            if dropped:
                assert len(kept) == capacity and min(kept) >= max(dropped), e


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "") -> None:
    assert actual.shape == expected.shape, what
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), what
    scale = max(e.abs().max().item(), 1e-6)
    err = (a - e).abs().max().item()
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e} > {rtol:.1e} * {scale:.3e}"


def named_grads(layer: MoELayer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------
# output and gradients equal the brute-force reference


@pytest.mark.parametrize("num_shared", [0, 2])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_bruteforce_reference(case: str, backend: str, num_shared: int) -> None:
    layer = make_layer(case, backend, num_shared)
    mask_ratio = mask_ratio_for(case)
    x = torch.randn(BATCH, LENGTH, DIM)
    upstream = torch.randn(BATCH, LENGTH, DIM)

    x1 = x.clone().requires_grad_(True)
    out, moe_out = layer(x1, mask_ratio)
    assert isinstance(moe_out, MoEOutput) and out.shape == x.shape and out.dtype == torch.float32
    check_routing_rule(layer, x, moe_out.dispatch, mask_ratio)
    (out * upstream).sum().backward()
    got_grads = named_grads(layer)
    layer.zero_grad(set_to_none=True)

    x2 = x.clone().requires_grad_(True)
    ref = reference_forward(layer, x2, moe_out.dispatch)
    (ref * upstream).sum().backward()
    want_grads = named_grads(layer)

    assert_rel_close(out, ref, FP32_RTOL, "output")
    assert_rel_close(x1.grad, x2.grad, FP32_RTOL, "grad x")
    expected_params = {"router.weight", "experts.gate_up_proj", "experts.down_proj"}
    if num_shared:
        expected_params |= {"shared_experts.gate_up_proj.weight", "shared_experts.down_proj.weight"}
    assert set(got_grads) == set(want_grads) == expected_params
    for name in expected_params:
        assert torch.count_nonzero(got_grads[name]) > 0, f"no gradient reaches {name}"
        assert_rel_close(got_grads[name], want_grads[name], FP32_RTOL, f"grad {name}")


def test_router_gradient_flows_only_through_gates() -> None:
    """Routing decisions are discrete; the router weight learns only via the combine gates.

    With top-1 and renormalisation every gate is 1, so the output carries no router gradient (up
    to rounding); without renormalisation the gate is the softmax probability and it does.
    """
    renorm = make_layer("tc_dropless", num_experts_per_tok=1, renormalize=True)
    plain = make_layer("tc_dropless", num_experts_per_tok=1, renormalize=False)
    plain.load_state_dict(renorm.state_dict())
    x = torch.randn(BATCH, LENGTH, DIM)
    upstream = torch.randn(BATCH, LENGTH, DIM)
    router_grad = []
    for layer in (renorm, plain):
        out, moe_out = layer(x)
        assert moe_out.dispatch.gate.requires_grad
        (out * upstream).sum().backward()
        assert torch.count_nonzero(layer.experts.down_proj.grad) > 0
        router_grad.append(layer.router.weight.grad.abs().max().item())
    assert torch.allclose(renorm(x)[1].dispatch.gate, torch.ones(BATCH * LENGTH))
    assert router_grad[1] > 1e-3
    assert router_grad[0] < 1e-4 * router_grad[1]


# ---------------------------------------------------------------------------------------------
# router losses


def test_tc_aux_loss_in_training_and_zero_in_eval() -> None:
    aux_coef, z_coef = 0.1, 0.01
    layer = make_layer("tc_dropless", aux_loss_coef=aux_coef, z_loss_coef=z_coef)
    x = torch.randn(BATCH, LENGTH, DIM)
    layer.train()
    _, moe_out = layer(x)
    aux = moe_out.aux_loss
    assert aux.shape == () and aux.dtype == torch.float32 and aux.requires_grad

    n, k, num_e = BATCH * LENGTH, 2, NUM_EXPERTS
    logits = x.reshape(n, DIM) @ layer.router.weight.T
    probs = torch.softmax(logits, -1)
    load = torch.bincount(logits.topk(k, -1).indices.flatten(), minlength=num_e).float()
    switch = num_e / (n * n * k) * (probs.sum(0) * load).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(aux, aux_coef * switch + z_coef * z, rtol=1e-5, atol=1e-7)

    aux.backward()  # the router losses train the router weight
    assert torch.count_nonzero(layer.router.weight.grad) > 0

    layer.eval()
    _, moe_eval = layer(x)
    assert moe_eval.aux_loss.item() == 0.0


def test_ec_z_loss_in_training_and_zero_in_eval() -> None:
    layer = make_layer("ec", z_loss_coef=0.05)
    x = torch.randn(BATCH, LENGTH, DIM)
    _, moe_out = layer.train()(x)
    logits = x.reshape(-1, DIM) @ layer.router.weight.T
    torch.testing.assert_close(moe_out.aux_loss, 0.05 * torch.logsumexp(logits, -1).square().mean())
    _, moe_eval = layer.eval()(x)
    assert moe_eval.aux_loss.item() == 0.0


def test_aux_loss_zero_without_coefficients() -> None:
    layer = make_layer("tc_dropless").train()
    _, moe_out = layer(torch.randn(BATCH, LENGTH, DIM))
    assert moe_out.aux_loss.item() == 0.0


# ---------------------------------------------------------------------------------------------
# mask ratio → EC capacity schedule


def test_mask_ratio_feeds_ec_capacity_schedule() -> None:
    num_e, length, batch = 16, 12, 4
    layer = MoELayer(
        MoEConfig(
            router=RouterConfig(
                kind="expert_choice",
                num_experts=num_e,
                num_experts_per_tok=4,
                capacity_schedule="linear",
                k_min=1,
                k_max=num_e,
            ),
            expert_hidden=HIDDEN,
        ),
        DIM,
    )
    x = torch.randn(batch, length, DIM)
    # k_b = round(1 + 15 r) (half to even): 1, 8 (8.5 → 8), 16, 4;  C_b = max(⌊12 k_b / 16⌋, 1): 1, 6, 12, 3
    mask_ratio = torch.tensor([0.0, 0.5, 1.0, 0.2])
    k_b = [round(1 + 15 * r) for r in mask_ratio.double().tolist()]
    cap_b = [max(length * k // num_e, 1) for k in k_b]
    assert cap_b == [1, 6, 12, 3]

    _, moe_out = layer(x, mask_ratio)
    d = moe_out.dispatch
    assert d.equal_counts
    assert d.counts.tolist() == [sum(cap_b)] * num_e
    per_seq = torch.zeros(num_e, batch, dtype=torch.int64)
    per_seq.index_put_((d.expert_index, d.token_index // length), torch.ones_like(d.token_index), accumulate=True)
    assert per_seq.tolist() == [cap_b] * num_e

    # a different mask ratio changes the capacity (and so the expert FLOPs)
    _, other = layer(x, torch.full((batch,), 1.0))
    assert other.dispatch.counts.tolist() == [batch * length] * num_e


def test_capacity_schedule_needs_mask_ratio() -> None:
    layer = make_layer("ec_schedule")
    x = torch.randn(BATCH, LENGTH, DIM)
    with pytest.raises(ValueError, match="mask_ratio"):
        layer(x)
    with pytest.raises(ValueError):
        layer(x, torch.tensor([0.5, 0.5, 0.5]))  # wrong batch size
    with pytest.raises(ValueError):
        layer(x, torch.tensor([0.5, 1.5]))  # out of [0, 1]


# ---------------------------------------------------------------------------------------------
# bf16 autocast


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_bf16_autocast_close_to_fp32(case: str, backend: str) -> None:
    layer = make_layer(case, backend, num_shared=1)
    mask_ratio = mask_ratio_for(case)
    x = torch.randn(BATCH, LENGTH, DIM)
    upstream = torch.randn(BATCH, LENGTH, DIM)
    results = []
    for bf16 in (False, True):
        layer.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out, moe_out = layer(xg, mask_ratio)
        assert out.dtype == (torch.bfloat16 if bf16 else torch.float32)
        (out.float() * upstream).sum().backward()
        results.append((out.detach(), moe_out.dispatch, xg.grad, named_grads(layer)))
    (o32, d32, gx32, g32), (o16, d16, gx16, g16) = results
    # routing runs in fp32 under autocast, so the decision is identical
    assert torch.equal(d32.token_index, d16.token_index) and torch.equal(d32.expert_index, d16.expert_index)
    assert d16.gate.dtype == torch.float32
    torch.testing.assert_close(d16.gate, d32.gate, rtol=0, atol=0)  # fp32 router logits under autocast too
    assert_rel_close(o16.float(), o32, BF16_RTOL, "output")
    assert not torch.equal(o16.float(), o32)  # really computed in bf16
    assert_rel_close(gx16, gx32, 2 * BF16_RTOL, "grad x")
    assert set(g16) == set(g32)
    for name in g32:
        assert g16[name].dtype == torch.float32
        assert_rel_close(g16[name], g32[name], 2 * BF16_RTOL, f"grad {name}")


# ---------------------------------------------------------------------------------------------
# input validation


@pytest.mark.parametrize(
    "shape",
    [(LENGTH, DIM), (DIM,), (1, BATCH, LENGTH, DIM), (BATCH, LENGTH, DIM + 1), (BATCH, LENGTH, DIM - 1)],
)
def test_bad_input_shape_raises(shape: tuple[int, ...]) -> None:
    layer = make_layer("tc_dropless")
    with pytest.raises(ValueError):
        layer(torch.randn(*shape))


def test_integer_input_raises() -> None:
    layer = make_layer("tc_dropless")
    with pytest.raises(ValueError):
        layer(torch.ones(BATCH, LENGTH, DIM, dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# EC: tokens no expert chose


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("num_shared", [0, 1])
def test_ec_unchosen_tokens_get_exactly_shared_output(num_shared: int, bf16: bool) -> None:
    # k = 1 of 4 experts over 16 tokens: C = 4 per expert and sequence, so some tokens are left out
    layer = MoELayer(
        MoEConfig(
            router=RouterConfig(kind="expert_choice", num_experts=4, num_experts_per_tok=1),
            expert_hidden=HIDDEN,
            num_shared_experts=num_shared,
        ),
        DIM,
    )
    x = torch.randn(2, 16, DIM)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out, moe_out = layer(x)
        shared = layer.shared_experts(x.reshape(-1, DIM)) if num_shared else None
    per_token = moe_out.dispatch.experts_per_token()
    unchosen = per_token == 0
    assert 0 < int(unchosen.sum()) < per_token.numel(), "the draw must leave some (not all) tokens out"
    out_ND = out.reshape(-1, DIM)
    if num_shared:
        assert torch.equal(out_ND[unchosen], shared[unchosen])
        assert not torch.equal(out_ND[~unchosen], shared[~unchosen])
    else:
        assert torch.count_nonzero(out_ND[unchosen]) == 0
        assert torch.all(out_ND[~unchosen].abs().sum(-1) > 0)


def test_shared_width_config() -> None:
    layer = MoELayer(MoEConfig(router=RouterConfig(), expert_hidden=8, num_shared_experts=3), DIM)
    assert layer.shared_experts.gate_up_proj.weight.shape == (2 * 24, DIM)
    layer = MoELayer(MoEConfig(router=RouterConfig(), expert_hidden=8, num_shared_experts=3, shared_hidden=5), DIM)
    assert layer.shared_experts.down_proj.weight.shape == (DIM, 5)
    assert MoELayer(MoEConfig(router=RouterConfig(), expert_hidden=8), DIM).shared_experts is None


def test_routed_experts_off_leaves_exactly_the_shared_experts():
    from dlmoe.config import ModelConfig
    from dlmoe.model.transformer import DiffusionTransformer
    from dlmoe.moe import routed_experts_off

    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(router=RouterConfig(num_experts=4, num_experts_per_tok=2), expert_hidden=8,
                               num_shared_experts=1), dim=16)  # fmt: skip
    x = torch.randn(2, 6, 16)
    full, _ = layer(x)
    with routed_experts_off(layer):
        shared_only, moe = layer(x)
    assert torch.equal(shared_only, layer.shared_experts(x.reshape(-1, 16)).view_as(x))
    assert not torch.allclose(full, shared_only) and moe.dispatch.num_slots > 0  # routing still ran
    assert torch.equal(layer(x)[0], full)  # restored on exit
    dense = DiffusionTransformer(ModelConfig(vocab_size=32, dim=16, num_layers=1, num_heads=2, moe=None))
    with pytest.raises(ValueError, match="needs a model with MoE layers"), routed_experts_off(dense):
        pass
