"""The routed-experts-off control: how much a trained model's routed experts contribute at all.

A router comparison only means something where the routed experts matter. The control evaluates
a finished run's validation ELBO twice on the same fixed noise — as trained, and with every MoE
layer's routed output dropped (shared experts, attention and everything else kept,
`dlmoe.moe.routed_experts_off`) — and reports the difference in nats per token. An experiment's
scale is chosen so that this costs at least `MIN_ROUTED_CONTRIBUTION`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MIN_ROUTED_CONTRIBUTION = 0.3  # nats / token the routed experts must be worth at the chosen scale


def routed_experts_control(run_dir: Path) -> dict[str, float]:
    """{"val_elbo", "val_elbo_routed_off", "routed_contribution"} of the finished run in `run_dir`."""
    from dlmoe.diffusion.validation import validation_elbo
    from dlmoe.inference import load_run
    from dlmoe.moe import routed_experts_off
    from dlmoe.train.data_setup import prepare_data

    config, model, _ = load_run(run_dir)
    batches = prepare_data(config, Path(run_dir)).validation_batches

    def elbo() -> float:
        return validation_elbo(
            model, batches, mask_id=config.model.mask_id, two_stream=config.model.block_causal,
            antithetic=config.train.antithetic,
        ).nats_per_token  # fmt: skip

    on = elbo()
    with routed_experts_off(model):
        off = elbo()
    return {"val_elbo": on, "val_elbo_routed_off": off, "routed_contribution": off - on}


def control_line(results: dict[str, Any]) -> str:
    """The report's line on the routed-experts-off control of every variant (`results["controls"]`:
    variant → per-seed records): how much the routed experts are worth, against the bar."""
    from dlmoe.experiments.common import format_stats, seed_stats

    if not results.get("controls"):
        return "Routed-experts-off control: not measured by this run."
    parts = []
    for name, per_seed in results["controls"].items():
        stats = seed_stats([r["routed_contribution"] for r in per_seed])
        parts.append(f"{name} {format_stats(stats, 3)}")
    low = [
        name for name, per_seed in results["controls"].items()
        if seed_stats([r["routed_contribution"] for r in per_seed])["mean"] < MIN_ROUTED_CONTRIBUTION
    ]  # fmt: skip
    verdict_text = (
        f"below the {MIN_ROUTED_CONTRIBUTION} nats this comparison needs for {low}: the routers barely matter here"
        if low
        else f"above {MIN_ROUTED_CONTRIBUTION} nats for every variant: the routed experts matter at this scale"
    )
    return (
        "Routed-experts-off control (validation ELBO with every routed expert's output dropped minus the ELBO "
        f"as trained, nats/token, mean ± std over seeds): {', '.join(parts)} — {verdict_text}."
    )
