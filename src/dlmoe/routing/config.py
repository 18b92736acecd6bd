"""Router configs, one class per router kind, validated when built.

`RouterConfig` holds what every router has (kind, E, k, z-loss, scaling factor, block routing);
`TokenChoiceConfig` and `ExpertChoiceConfig` add their own knobs, so an option of the other kind
cannot be set by accident. `RouterConfig(kind=..., ...)` (and `dataclasses.replace(config,
kind=...)`) builds the class of that kind: old flat configs and calls still work — a field of the
other kind at its neutral default is dropped, any other value is refused by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dlmoe._checks import check_choice, check_float, check_int
from dlmoe.routing.schedules import DEFAULT_SIGMA, expected_k, validate_schedule
from dlmoe.vocab import GATES, POOLS, ROUTER_KINDS, SCHEDULE_NAMES, SCORE_FUNCTIONS, SELECT


@dataclass(kw_only=True)
class BlockRoutingConfig:
    """dMoE block routing: `block_size` tokens vote a coreset covering `top_p` of the votes."""

    block_size: int = 32
    top_p: float = 0.6
    guard: int = 16

    def __post_init__(self) -> None:
        check_int("block.block_size", self.block_size, low=1)
        check_float("block.top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        check_int("block.guard", self.guard, low=1)


class _ByKind(type):
    """Building any router config builds the class registered for its `kind` (see the module docstring)."""

    def __call__(cls, **kwargs: Any) -> Any:
        kind = kwargs.get("kind", cls.__dataclass_fields__["kind"].default)  # type: ignore[attr-defined]
        check_choice("router.kind", kind, ROUTER_KINDS)
        target = ROUTER_CONFIGS[kind]
        return super(_ByKind, target).__call__(**fields_for_kind(kind, kwargs))


def fields_for_kind(kind: str, kwargs: dict[str, Any], where: str = "router") -> dict[str, Any]:
    """`kwargs` without the other kind's fields at their neutral defaults; other values of those are
    refused (ValueError naming them, as `{where}.name`); unknown names are kept (for the caller to refuse)."""
    own = {f.name for f in dataclasses.fields(ROUTER_CONFIGS[kind])}
    refused = []
    kept = {}
    for name, value in kwargs.items():
        owner = None if name in own else other_kind_field(name)
        if owner is None:
            kept[name] = value  # ours, or unknown: the dataclass refuses it
        elif value != owner[1]:
            refused.append((name, value, owner))
    if refused:
        names = ", ".join(f"{where}.{name}={value!r}" for name, value, _ in refused)
        kinds = sorted({owner[0] for _, _, owner in refused})
        neutral = ", ".join(f"{name}={owner[1]!r}" for name, _, owner in refused)
        raise ValueError(
            f"{names} {'applies' if len(refused) == 1 else 'apply'} to {where}.kind={' / '.join(map(repr, kinds))} "
            f"only; this router is kind={kind!r}: leave {neutral} or set {where}.kind={kinds[0]!r}"
        )
    return kept


def other_kind_field(name: str) -> tuple[str, Any] | None:
    """(kind, neutral default) of a field that only one kind has; None for shared or unknown names."""
    return _KIND_FIELDS.get(name)


@dataclass(kw_only=True)
class RouterConfig(metaclass=_ByKind):
    """Which router, and what every kind has.

    `kind`, `num_experts`, `num_experts_per_tok` (k; EC's static k), `z_loss_coef` (training only),
    `block` (dMoE block routing: each block's tokens route only inside its coreset), and
    `scaling_factor`: EC-DLM's `--enable-scaling-factor` — a token's routed gates are multiplied by
    f = E_z[√S / ‖p̂‖₂] (S = `moe.num_shared_experts`, p̂ its routed gates under random logits),
    so the routed part has the shared experts' expected norm: one constant for token choice, a
    table indexed by each token's routed count for expert choice (`dlmoe.routing.scaling`; applied
    in `MoELayer`). Needs shared experts.

    `RouterConfig(kind="expert_choice", ...)` returns an `ExpertChoiceConfig`, the default kind a
    `TokenChoiceConfig`. Reading a field of the other kind gives its neutral default (old callers).
    """

    kind: str = "token_choice"
    num_experts: int = 8
    num_experts_per_tok: int = 2
    z_loss_coef: float = 0.0
    scaling_factor: bool = False
    block: BlockRoutingConfig | None = None

    def __post_init__(self) -> None:
        check_choice("router.kind", self.kind, ROUTER_KINDS)
        check_int("router.num_experts", self.num_experts, low=1)
        check_int("router.num_experts_per_tok", self.num_experts_per_tok, low=1, high=self.num_experts)
        check_float("router.z_loss_coef", self.z_loss_coef, low=0.0)
        if not isinstance(self.scaling_factor, bool):
            raise ValueError(f"router.scaling_factor must be a bool, got {self.scaling_factor!r}")
        if isinstance(self.block, dict):
            self.block = BlockRoutingConfig(**self.block)
        if self.block is not None and self.block.guard > self.num_experts:
            raise ValueError(
                f"router.block.guard must be <= router.num_experts={self.num_experts}, got {self.block.guard} "
                "(the default, 16, is dMoE's; set block.guard for fewer experts)"
            )

    def __getattr__(self, name: str) -> Any:
        """A field of the other kind reads as its neutral default (what it means for this kind)."""
        owner = other_kind_field(name) if not name.startswith("__") else None
        if owner is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return owner[1]

    def expected_experts_per_token(self) -> float:
        """Average experts per token (∝ active expert FLOPs) under r ~ U(0, 1)."""
        return float(self.num_experts_per_tok)


SHARED_FIELDS = frozenset(f.name for f in dataclasses.fields(RouterConfig))


@dataclass(kw_only=True)
class TokenChoiceConfig(RouterConfig):
    """Token choice: each token picks its top-k experts.

    `score` softmax | sigmoid, `renormalize` the chosen gates, `capacity_factor` (None = dropless),
    `aux_loss_coef` (Switch balance loss), `expert_bias` (loss-free balancing, `bias_update_rate`;
    `bias_in_gate`: LLaDA-MoE's in-place `p += b` reaches the gates), group-limited top-k
    (`n_group`, `topk_group`), `routed_scaling_factor` (LLaDA2 / DeepSeek-V3's fixed multiplier,
    refused together with `scaling_factor`: both set the routed part's scale).

    With `block` routing (dMoE) the forward is dropless inside each block's coreset and trains on
    the diffusion loss (+ z-loss) only, as dMoE and LLaDA2: `capacity_factor` and `aux_loss_coef`
    are refused there (a balance loss would push against the concentration the coreset is for).
    """

    kind: str = "token_choice"
    score: str = "softmax"
    renormalize: bool = True
    capacity_factor: float | None = None
    aux_loss_coef: float = 0.0
    expert_bias: bool = False
    bias_in_gate: bool = False
    bias_update_rate: float = 1e-3
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("router.score", self.score, SCORE_FUNCTIONS)
        if self.capacity_factor is not None:
            check_float("router.capacity_factor", self.capacity_factor, low=0.0, low_open=True)
        check_float("router.aux_loss_coef", self.aux_loss_coef, low=0.0)
        check_float("router.bias_update_rate", self.bias_update_rate, low=0.0)
        check_float("router.routed_scaling_factor", self.routed_scaling_factor, low=0.0, low_open=True)
        self._check_groups()
        if self.bias_in_gate and not self.expert_bias:
            raise ValueError(
                "router.bias_in_gate=true needs router.expert_bias=true (it puts that bias into the gates)"
            )
        if self.scaling_factor and self.routed_scaling_factor != 1.0:
            raise ValueError(
                "router.scaling_factor=true (EC-DLM's norm-matching factor) and "
                f"router.routed_scaling_factor={self.routed_scaling_factor} (a fixed multiplier) both set the scale "
                "of the routed gates; use one of them"
            )
        if self.block is not None:
            check_block_training(self, self.block)

    def _check_groups(self) -> None:
        if (self.n_group is None) != (self.topk_group is None):
            raise ValueError(f"router.n_group and router.topk_group go together, got {self.n_group}, {self.topk_group}")
        if self.n_group is not None:
            check_int("router.n_group", self.n_group, low=1, high=self.num_experts)
            if self.num_experts % self.n_group:
                raise ValueError(f"router.n_group={self.n_group} must divide num_experts={self.num_experts}")
            check_int("router.topk_group", self.topk_group, low=1, high=self.n_group)


def check_block_training(config: RouterConfig, block: BlockRoutingConfig) -> None:
    """Block routing trains as dMoE: no capacity factor, no balance loss (ValueError naming them)."""
    bad = []
    if getattr(config, "aux_loss_coef", 0.0) > 0:
        bad.append(f"router.aux_loss_coef={config.aux_loss_coef}")
    if getattr(config, "capacity_factor", None) is not None:
        bad.append(f"router.capacity_factor={config.capacity_factor}")
    if bad:
        raise ValueError(
            f"{' and '.join(bad)} cannot train with block routing (router.block={block}): block routing is dropless "
            "inside each block's coreset, and a balance loss would push against the concentration the coreset "
            "exists for (dMoE trains on the diffusion loss only); set router.aux_loss_coef=0 and "
            "router.capacity_factor=null"
        )


@dataclass(kw_only=True)
class ExpertChoiceConfig(RouterConfig):
    """Expert choice: each expert picks its top-C tokens; balanced by construction.

    `pool` sequence | batch (which tokens an expert ranks), `select` logit | score, `gate`:
    "restricted" (softmax over the experts that chose the token; EC-DLM), "full" (the full softmax
    score; Zhou et al.), or "restricted_sigmoid" (σ(l) normalised over the experts that chose the
    token; EC-DLM's `moe_router_activation_function=sigmoid`). A timestep-dependent capacity:
    `capacity_schedule` with `k_min`, `k_max`, `schedule_sigma` (k from each row's mask ratio).
    """

    kind: str = "expert_choice"
    pool: str = "sequence"
    select: str = "logit"
    gate: str = "restricted"
    capacity_schedule: str | None = None
    k_min: int | None = None
    k_max: int | None = None
    schedule_sigma: float = DEFAULT_SIGMA

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("router.pool", self.pool, POOLS)
        check_choice("router.select", self.select, SELECT)
        check_choice("router.gate", self.gate, GATES)
        if self.scaling_factor and self.gate == "full":
            raise ValueError(
                "router.scaling_factor=true assumes a token's routed gates sum to 1 (router.gate='restricted' or "
                "'restricted_sigmoid', EC-DLM's); router.gate='full' gives softmax weights over all experts"
            )
        self._check_schedule()

    def _check_schedule(self) -> None:
        if self.capacity_schedule is None:
            return
        if self.capacity_schedule not in SCHEDULE_NAMES:
            raise ValueError(
                f"router.capacity_schedule must be one of {list(SCHEDULE_NAMES)}, got {self.capacity_schedule!r}"
            )
        validate_schedule(self.capacity_schedule, self.schedule_sigma)
        if self.k_min is None or self.k_max is None:
            raise ValueError(
                f"router.capacity_schedule={self.capacity_schedule!r} needs router.k_min and router.k_max "
                f"(ints, 1 <= k_min <= k_max <= num_experts), got k_min={self.k_min}, k_max={self.k_max}"
            )
        check_int("router.k_min", self.k_min, low=1, high=self.num_experts)
        check_int("router.k_max", self.k_max, low=1, high=self.num_experts)
        if self.k_min > self.k_max:
            raise ValueError(f"router.k_min must be <= router.k_max, got {self.k_min} > {self.k_max}")

    def expected_experts_per_token(self) -> float:
        if self.capacity_schedule is None:
            return float(self.num_experts_per_tok)
        return expected_k(self.capacity_schedule, self.k_min, self.k_max, sigma=self.schedule_sigma)  # type: ignore[arg-type]

    def capacity_key(self) -> tuple[Any, ...]:
        """What the per-forward k and capacities depend on (a model computes them once per forward)."""
        schedule = (self.capacity_schedule, self.k_min, self.k_max, self.schedule_sigma)
        return (self.num_experts, self.num_experts_per_tok, self.pool, *schedule)


def rule_of(rule_type: type, config: RouterConfig, **given: Any) -> Any:
    """The frozen rule a functional router reads (`TopKRule`, `ExpertChoiceRule`), from the config's
    fields of the same names: a router builds it once, so no field list is spelled twice."""
    names = [f.name for f in dataclasses.fields(rule_type) if f.name not in given]
    return rule_type(**given, **{name: getattr(config, name) for name in names})


ROUTER_CONFIGS: dict[str, type[RouterConfig]] = {"token_choice": TokenChoiceConfig, "expert_choice": ExpertChoiceConfig}
assert tuple(ROUTER_CONFIGS) == ROUTER_KINDS, "dlmoe.vocab.ROUTER_KINDS must list every router config"
_KIND_FIELDS: dict[str, tuple[str, Any]] = {
    f.name: (kind, f.default)
    for kind, config_class in ROUTER_CONFIGS.items()
    for f in dataclasses.fields(config_class)
    if f.name not in SHARED_FIELDS
}

__all__ = [
    "ROUTER_CONFIGS",
    "BlockRoutingConfig",
    "ExpertChoiceConfig",
    "RouterConfig",
    "TokenChoiceConfig",
    "check_block_training",
    "fields_for_kind",
    "other_kind_field",
    "rule_of",
]
