"""Block routing trains as dMoE: z-loss honoured, no balance loss, no capacity factor.

dMoE fine-tunes with block routing in the forward and the masked-token CE only (LLaDA2's gate has a
fixed expert bias and no balance loss); block routing is dropless inside each block's coreset. So a
router's z-loss applies under block routing (over the valid tokens' full logits, training only),
while an aux loss or a capacity factor is refused — in the config and when a router in training
mode is switched to block routing at run time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from dlmoe.config import BlockRoutingConfig, RouterConfig
from dlmoe.config_io import load_run_config, run_config_to_dict
from dlmoe.routing import RoutingContext, build_router, z_loss
from dlmoe.routing.routers import block_routing

DIM, E = 16, 8
BLOCK = BlockRoutingConfig(block_size=4, top_p=0.6, guard=4)
CONFIGS = Path(__file__).parents[2] / "configs"


def make_x(batch: int = 2, length: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, length, DIM, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("extra", [{"aux_loss_coef": 0.01}, {"capacity_factor": 1.25}], ids=["aux", "capacity"])
def test_block_routing_refuses_a_balance_loss_or_capacity_in_the_config(extra: dict) -> None:
    (name,) = extra
    with pytest.raises(ValueError, match=rf"router\.{name}=.*block routing.*aux_loss_coef=0.*capacity_factor=null"):
        RouterConfig(num_experts=E, block=BLOCK, **extra)
    with pytest.raises(ValueError, match=rf"router\.{name}"):
        load_run_config(None, [f"model.moe.router.{name}={extra[name]}", "model.moe.router.block.guard=4"])


@pytest.mark.parametrize("extra", [{"aux_loss_coef": 0.01}, {"capacity_factor": 1.25}], ids=["aux", "capacity"])
def test_switching_a_training_router_to_block_routing_is_refused(extra: dict) -> None:
    (name,) = extra
    router = build_router(RouterConfig(num_experts=E, **extra), DIM)
    model = nn.Sequential(router)
    x = make_x()
    router.train()
    with pytest.raises(ValueError, match=rf"router\.{name}.*block routing"):
        router(x, context=RoutingContext(block=BLOCK))
    with pytest.raises(ValueError, match=rf"router\.{name}.*block routing"), block_routing(model, BLOCK):
        pass
    assert router.block is None  # nothing was switched
    router.eval()  # training-free evaluation with block routing stays possible
    with block_routing(model, BLOCK):
        assert router(x).coreset_mask is not None
    assert router(x, context=RoutingContext(block=BLOCK)).coreset_mask is not None


@pytest.mark.parametrize("kind", ["token_choice", "expert_choice"])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
def test_z_loss_under_block_routing_is_the_z_loss_of_the_same_logits(kind: str, padded: bool) -> None:
    router = build_router(RouterConfig(kind=kind, num_experts=E, z_loss_coef=1e-3, block=BLOCK), DIM)
    x = make_x(seed=1)
    valid = torch.ones(2, 8, dtype=torch.bool)
    if padded:
        valid[0, :3] = False
    context = RoutingContext(valid=valid if padded else None)
    logits_NE = router.logits(x).reshape(-1, E)
    expected = 1e-3 * z_loss(logits_NE[valid.reshape(-1)])
    router.train()
    dispatch = router(x, torch.tensor([0.3, 0.6]), context)
    assert dispatch.coreset_mask is not None  # block-routed
    assert float(dispatch.aux_loss.detach()) > 0
    torch.testing.assert_close(dispatch.aux_loss, expected, rtol=0, atol=0)
    dispatch.aux_loss.backward()  # the z-loss trains the router weight
    assert router.weight.grad is not None and bool(router.weight.grad.abs().sum() > 0)
    router.eval()
    assert float(router(x, torch.tensor([0.3, 0.6]), context).aux_loss) == 0.0


def test_the_bundled_finetune_config_resets_the_balance_loss_of_any_source() -> None:
    for source, kind in [("tc_aux", "token_choice"), ("llada2_style", "token_choice"), ("ec_dlm", "expert_choice")]:
        base = run_config_to_dict(load_run_config(CONFIGS / f"{source}.yaml"))
        router = load_run_config(CONFIGS / "dmoe_finetune.yaml", base=base).model.moe.router
        assert router.kind == kind and router.block == BlockRoutingConfig(block_size=32, top_p=0.6, guard=4)
        assert router.aux_loss_coef == 0.0 and router.capacity_factor is None
        assert router.z_loss_coef == base["model"]["moe"]["router"]["z_loss_coef"]  # the z-loss is kept
