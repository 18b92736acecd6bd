"""No device→host sync in the routing + expert path of an MoE layer.

On an accelerator a host read (`.item()`, `bool(t)`, `int(t)`, `.tolist()`) or an op whose output
shape depends on the data (nonzero, masked_select, unique, bincount, a bool index,
repeat_interleave without `output_size`) stalls the host until the device catches up — per
layer, that serialises the whole forward. The same ops run on the CPU, so they are counted here:
a `TorchDispatchMode` sees every aten call (`.tolist()` bypasses dispatch on the CPU and is patched),
forward hooks attribute them to the MoE layers or to the model around them.

Budget: 0 per MoE layer (EC static k, EC with a capacity schedule in training and eval, dropless
TC on the default, `bmm` and `grouped_mm` backends; the `loop` backend is exempt: it slices the
rows per expert, and `bmm` on TC's unequal counts reads the largest). Outside the layers, at most
1 per forward: the host-side capacities of a per-sample k, read once by the model for all layers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dlmoe.config import ModelConfig, MoEConfig, RouterConfig
from dlmoe.model.transformer import DiffusionTransformer
from dlmoe.moe import MoELayer

aten = torch.ops.aten
DATA_SHAPED = {  # output shape read from the data
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.bincount.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
}
MODEL_BUDGET = 1  # outside the MoE layers, per forward


def is_sync(func: object, args: tuple, kwargs: dict) -> bool:
    if func in DATA_SHAPED:
        return True
    if func is aten.repeat_interleave.Tensor:
        return kwargs.get("output_size") is None
    if func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return any(i is not None and i.dtype == torch.bool for i in args[1])
    return False


class SyncCounter(TorchDispatchMode):
    """Host syncs by place ("model", or the MoE layer's name) and by op."""

    def __init__(self) -> None:
        super().__init__()
        self.where = "model"
        self.counts: Counter[str] = Counter()
        self.ops: Counter[str] = Counter()

    def record(self, op: str) -> None:
        self.counts[self.where] += 1
        self.ops[f"{self.where}: {op}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_sync(func, args, kwargs):
            self.record(str(func))
        return func(*args, **kwargs)


@contextmanager
def count_syncs(model: torch.nn.Module) -> Iterator[SyncCounter]:
    counter = SyncCounter()
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            handles.append(module.register_forward_pre_hook(lambda *_, n=name: setattr(counter, "where", n)))
            handles.append(module.register_forward_hook(lambda *_: setattr(counter, "where", "model")))
    tolist = torch.Tensor.tolist

    def counted_tolist(self: torch.Tensor) -> object:  # the dispatch mode does not see it on the CPU
        counter.record("Tensor.tolist")
        return tolist(self)

    torch.Tensor.tolist = counted_tolist  # type: ignore[method-assign]
    try:
        with counter:
            yield counter
    finally:
        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        for handle in handles:
            handle.remove()


def tiny_model(router: RouterConfig, backend: str = "auto", shared: int = 0) -> DiffusionTransformer:
    moe = MoEConfig(router=router, expert_hidden=16, num_shared_experts=shared, backend=backend)
    config = ModelConfig(vocab_size=64, dim=32, num_layers=3, num_heads=4, max_seq_len=32, dense_hidden=32, moe=moe)
    torch.manual_seed(0)
    return DiffusionTransformer(config)


def syncs_of_forward(model: DiffusionTransformer, training: bool, mask_ratio: torch.Tensor | None) -> SyncCounter:
    model.train(training)
    ids = torch.randint(1, 64, (2, 24), generator=torch.Generator().manual_seed(1))
    ids[:, ::3] = 0  # mask tokens
    with torch.no_grad(), count_syncs(model) as counter:
        model(ids, mask_ratio=mask_ratio)
    return counter


EC = {"kind": "expert_choice", "num_experts": 8, "num_experts_per_tok": 2}
SCHEDULE = EC | {"capacity_schedule": "linear_reverse", "k_min": 1, "k_max": 4}
TC_LOSSES = {"num_experts": 8, "num_experts_per_tok": 2, "aux_loss_coef": 0.01, "z_loss_coef": 1e-3}
TC_LOSSES |= {"expert_bias": True, "scaling_factor": True}
CASES = {
    "ec-static": (EC, "auto", 0),
    "ec-static-bmm": (EC, "bmm", 0),
    "ec-batch-pool": (EC | {"pool": "batch"}, "auto", 0),
    "ec-scaling-factor": (EC | {"scaling_factor": True}, "auto", 1),
    "ec-schedule": (SCHEDULE, "auto", 0),
    "ec-schedule-batch-pool": (SCHEDULE | {"pool": "batch"}, "auto", 1),
    "tc-dropless": ({"num_experts": 8, "num_experts_per_tok": 2}, "auto", 0),
    "tc-dropless-grouped-mm": ({"num_experts": 8, "num_experts_per_tok": 2}, "grouped_mm", 1),
    "tc-losses-bias-scaling": (TC_LOSSES, "auto", 1),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("given_ratio", [True, False], ids=["mask_ratio", "default_ratio"])
@pytest.mark.parametrize("case", list(CASES))
def test_no_host_sync_in_the_moe_layers(case: str, training: bool, given_ratio: bool) -> None:
    router, backend, shared = CASES[case]
    model = tiny_model(RouterConfig(**router), backend, shared)
    mask_ratio = torch.tensor([0.25, 0.75]) if given_ratio else None
    counter = syncs_of_forward(model, training, mask_ratio)
    per_layer = {where: n for where, n in counter.counts.items() if where != "model"}
    report = f"{case}: {dict(counter.counts)} host syncs per model forward ({dict(counter.ops)})"
    print(report)
    assert not per_layer, report
    assert counter.counts["model"] <= MODEL_BUDGET, report
    if router.get("capacity_schedule") is None:
        assert counter.counts["model"] == 0, report  # a static k needs no host-side capacity


def test_the_counter_sees_each_kind_of_sync() -> None:
    t = torch.tensor([0, 2, 1])
    with count_syncs(torch.nn.Identity()) as counter:
        t.tolist()
        int(t.max())
        bool((t > 0).any())
        t[t > 0]
        t.nonzero()
        torch.bincount(t)
        torch.repeat_interleave(t, t)
        torch.repeat_interleave(t, t, output_size=3)  # not a sync: the size is given
    assert counter.counts["model"] == 7, dict(counter.ops)


def test_the_loop_backend_is_the_exemption() -> None:
    model = tiny_model(RouterConfig(num_experts=8, num_experts_per_tok=2), "loop")
    counter = syncs_of_forward(model, False, None)
    assert sum(n for where, n in counter.counts.items() if where != "model") > 0  # it slices rows per expert
