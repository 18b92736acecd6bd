"""Per-kind router configs: the kind picks the class; old flat configs and calls keep working.

`RouterConfig(kind=...)` (and `dataclasses.replace`) builds `TokenChoiceConfig` or
`ExpertChoiceConfig`; a field of the other kind is dropped at its neutral default and refused,
by name and kind, otherwise. Run configs (defaults ← saved config ← file ← overrides) take the
router schema of the effective kind; a kind switched by a later layer drops the earlier layers'
fields of the old kind.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from dlmoe.config import BlockRoutingConfig, ExpertChoiceConfig, MoEConfig, RouterConfig, TokenChoiceConfig
from dlmoe.config_io import load_run_config, run_config_from_dict, run_config_to_dict
from dlmoe.routing import ROUTERS
from dlmoe.routing.config import ROUTER_CONFIGS
from dlmoe.vocab import ROUTER_KINDS

CONFIGS = Path(__file__).parents[2] / "configs"
TC_NEUTRAL = {f.name: f.default for f in dataclasses.fields(TokenChoiceConfig) if f.name not in ("kind",)}
EC_NEUTRAL = {f.name: f.default for f in dataclasses.fields(ExpertChoiceConfig) if f.name not in ("kind",)}


def test_the_kind_picks_the_class() -> None:
    assert type(RouterConfig()) is TokenChoiceConfig
    ec = RouterConfig(kind="expert_choice", pool="batch", num_experts=4, num_experts_per_tok=1)
    assert type(ec) is ExpertChoiceConfig and ec.pool == "batch"
    assert type(ExpertChoiceConfig()) is ExpertChoiceConfig and ExpertChoiceConfig().kind == "expert_choice"
    assert isinstance(ec, RouterConfig)
    assert tuple(ROUTER_CONFIGS) == tuple(ROUTERS) == ROUTER_KINDS
    assert not {"pool", "capacity_schedule"} & {f.name for f in dataclasses.fields(TokenChoiceConfig)}
    assert not {"score", "aux_loss_coef"} & {f.name for f in dataclasses.fields(ExpertChoiceConfig)}


def test_old_flat_calls_drop_neutral_fields_of_the_other_kind() -> None:
    ec = RouterConfig(kind="expert_choice", **{k: v for k, v in TC_NEUTRAL.items() if k not in EC_NEUTRAL})
    assert ec == ExpertChoiceConfig()
    tc = RouterConfig(**{k: v for k, v in EC_NEUTRAL.items() if k not in TC_NEUTRAL})
    assert tc == TokenChoiceConfig()
    assert ec.score == "softmax" and ec.capacity_factor is None and tc.pool == "sequence"  # reads as neutral
    with pytest.raises(AttributeError):
        _ = ec.no_such_field


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "expert_choice", "aux_loss_coef": 0.01}, r"router\.aux_loss_coef=0\.01.*'token_choice' only"),
        ({"kind": "expert_choice", "expert_bias": True}, r"router\.expert_bias=True.*'token_choice'"),
        ({"kind": "expert_choice", "score": "sigmoid"}, r"router\.score='sigmoid'.*'token_choice'"),
        ({"pool": "batch"}, r"router\.pool='batch'.*'expert_choice' only.*kind='token_choice'"),
        ({"capacity_schedule": "linear", "k_min": 1, "k_max": 2}, r"capacity_schedule='linear'.*k_min=1.*k_max=2"),
    ],
)
def test_a_set_field_of_the_other_kind_is_refused_by_name(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RouterConfig(**kwargs)


def test_replace_swaps_the_kind_keeping_the_shared_fields() -> None:
    tc = RouterConfig(num_experts=16, num_experts_per_tok=4, z_loss_coef=1e-3, block=BlockRoutingConfig(guard=4))
    ec = dataclasses.replace(tc, kind="expert_choice")
    assert type(ec) is ExpertChoiceConfig
    assert (ec.num_experts, ec.num_experts_per_tok, ec.z_loss_coef, ec.block) == (16, 4, 1e-3, tc.block)
    assert type(dataclasses.replace(ec, kind="token_choice")) is TokenChoiceConfig
    with pytest.raises(ValueError, match=r"aux_loss_coef"):  # a TC option in use is not silently lost
        dataclasses.replace(RouterConfig(aux_loss_coef=0.01), kind="expert_choice")
    moe = MoEConfig(router={"kind": "expert_choice", "num_experts": 4, "capacity_factor": None})
    assert type(moe.router) is ExpertChoiceConfig and moe.router.num_experts == 4


def test_every_bundled_config_loads() -> None:
    kinds = {path.stem: load_run_config(path).model.moe.router.kind for path in sorted(CONFIGS.glob("*.yaml"))}
    assert kinds["demo"] == "expert_choice" and kinds["tc_aux"] == "token_choice"
    assert type(load_run_config(CONFIGS / "ec_dlm.yaml").model.moe.router) is ExpertChoiceConfig


def test_old_flat_saved_configs_load() -> None:
    for kind in ROUTER_KINDS:
        saved = run_config_to_dict(load_run_config(None, [f"model.moe.router.kind={kind}"]))
        saved["model"]["moe"]["router"] = TC_NEUTRAL | EC_NEUTRAL | {"kind": kind, "z_loss_coef": 1e-3}
        router = run_config_from_dict(json.loads(json.dumps(saved))).model.moe.router
        assert router.kind == kind and router.z_loss_coef == 1e-3
        assert router == RouterConfig(kind=kind, z_loss_coef=1e-3)


def test_a_later_layer_switching_the_kind_drops_the_old_kind_fields() -> None:
    base = run_config_to_dict(load_run_config(CONFIGS / "tc_aux.yaml"))  # aux 0.01, capacity 1.25
    router = load_run_config(None, ["model.moe.router.kind=expert_choice"], base=base).model.moe.router
    assert type(router) is ExpertChoiceConfig and router.num_experts == 16 and router.z_loss_coef == 1e-3
    back = run_config_to_dict(load_run_config(CONFIGS / "demo.yaml"))  # an EC schedule
    router = load_run_config(None, ["model.moe.router.kind=token_choice"], base=back).model.moe.router
    assert type(router) is TokenChoiceConfig and router.num_experts == 16
    # the layer that sets the kind (or a later one) may not set a field of the other kind
    with pytest.raises(ValueError, match=r"model\.moe\.router\.aux_loss_coef=0\.5.*'token_choice' only"):
        load_run_config(None, ["model.moe.router.kind=expert_choice", "model.moe.router.aux_loss_coef=0.5"], base=base)
    with pytest.raises(ValueError, match=r"model\.moe\.router\.pool='batch'.*'expert_choice' only"):
        load_run_config(None, ["model.moe.router.pool=batch"])


def test_unknown_router_keys_are_refused_with_the_closest_names() -> None:
    with pytest.raises(ValueError, match=r"pol.*ExpertChoiceConfig.*Did you mean.*'pool'"):
        load_run_config(None, ["model.moe.router.kind=expert_choice", "model.moe.router.pol=batch"])
    with pytest.raises(ValueError, match=r"scroe.*TokenChoiceConfig.*Did you mean.*'score'"):
        load_run_config(None, ["model.moe.router.scroe=sigmoid"])
    with pytest.raises(ValueError, match=r"router\.kind.*'hash'"):
        load_run_config(None, ["model.moe.router.kind=hash"])
