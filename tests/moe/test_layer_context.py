"""MoELayer with a RoutingContext (inference): left padding, decoding blocks, block routing, EC capacity.

Outputs and input gradients are checked against the brute-force reference of `test_layer`, and a
left-padded row against the same row run alone.
"""

from __future__ import annotations

import pytest
import torch

from dlmoe.config import BlockRoutingConfig
from dlmoe.routing.context import RoutingContext
from tests.moe.test_layer import (
    BATCH,
    DIM,
    FP32_RTOL,
    LENGTH,
    MASK_RATIO,
    NUM_EXPERTS,
    assert_rel_close,
    make_layer,
    mask_ratio_for,
    reference_forward,
)

# ---------------------------------------------------------------------------------------------
# RoutingContext at inference: left padding, decoding blocks, block routing, EC capacity override

PAD = 3
VALID = torch.arange(LENGTH).expand(BATCH, LENGTH) >= torch.tensor([[PAD], [0]])  # row 0 left-padded
BLOCK_IDS = torch.tensor([-1, -1, -1, 0, 0, 0, 1, 1])  # the pads and a prompt block, then two decoding blocks
EC_BLOCK = BlockRoutingConfig(block_size=4, top_p=0.6, guard=3)
CONTEXT_CASES = {  # layer case, context without the padding
    "ec": ("ec", {}),
    "ec_override": ("ec_schedule", {"experts_per_token": torch.tensor([3, 1])}),
    "ec_block": ("ec", {"block": EC_BLOCK, "block_ids": BLOCK_IDS}),
    "ec_block_override": (
        "ec_schedule",
        {"block": EC_BLOCK, "block_ids": BLOCK_IDS, "experts_per_token": torch.tensor([2, 5])},
    ),
    "tc_dropless": ("tc_dropless", {}),
    "tc_block": ("tc_block", {"block_ids": BLOCK_IDS}),
}


@pytest.mark.parametrize("num_shared", [0, 1])
@pytest.mark.parametrize("name", list(CONTEXT_CASES))
def test_context_padding_matches_reference_and_row_alone(name: str, num_shared: int) -> None:
    case, extra = CONTEXT_CASES[name]
    layer = make_layer(case, num_shared=num_shared)
    mask_ratio = mask_ratio_for(case)
    x = torch.randn(BATCH, LENGTH, DIM)
    x1 = x.clone().requires_grad_(True)
    out, moe_out = layer(x1, mask_ratio, RoutingContext(valid=VALID, **extra))
    dispatch = moe_out.dispatch
    assert not bool((~VALID).reshape(-1)[dispatch.token_index].any()), "a pad got a slot"
    if "block" in extra:
        assert dispatch.coreset_mask is not None and dispatch.block_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    upstream = torch.randn(BATCH, LENGTH, DIM)
    (out * upstream).sum().backward()
    x2 = x.clone().requires_grad_(True)
    ref = reference_forward(layer, x2, dispatch)
    assert_rel_close(out, ref, FP32_RTOL, "output")
    (ref * upstream).sum().backward()
    assert_rel_close(x1.grad, x2.grad, FP32_RTOL, "grad x")
    pads = out[~VALID]
    if num_shared:
        torch.testing.assert_close(pads, layer.shared_experts(x[~VALID]))
    else:
        assert torch.count_nonzero(pads) == 0
    # row 0 routed alone (no padding) gives the same output on its tokens
    alone_extra = dict(extra)
    if "block_ids" in extra:
        alone_extra["block_ids"] = BLOCK_IDS[PAD:]
    if "experts_per_token" in extra:
        alone_extra["experts_per_token"] = extra["experts_per_token"][:1]
    with torch.no_grad():
        alone, _ = layer(x[:1, PAD:], None if mask_ratio is None else mask_ratio[:1], RoutingContext(**alone_extra))
    torch.testing.assert_close(out[0, PAD:].detach(), alone[0], rtol=1e-5, atol=1e-6)


def test_ec_capacity_override_through_the_layer() -> None:
    layer = make_layer("ec_schedule")
    k_b = torch.tensor([1, 8])
    _, moe_out = layer(torch.randn(BATCH, LENGTH, DIM), MASK_RATIO, RoutingContext(experts_per_token=k_b))
    rows = moe_out.dispatch.token_index // LENGTH
    for e in range(NUM_EXPERTS):
        got = torch.bincount(rows[moe_out.dispatch.expert_index == e], minlength=BATCH).tolist()
        assert got == [max(LENGTH * int(k) // NUM_EXPERTS, 1) for k in k_b]


def test_token_choice_layer_refuses_capacity_override() -> None:
    layer = make_layer("tc_dropless")
    with pytest.raises(ValueError, match="experts_per_token"):
        layer(torch.randn(BATCH, LENGTH, DIM), None, RoutingContext(experts_per_token=torch.tensor([1, 2])))
