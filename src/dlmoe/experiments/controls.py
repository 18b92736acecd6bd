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


def control_summary(per_run: list[dict[str, float]]) -> dict[str, Any]:
    """Seed statistics of the control over runs, and whether it clears the bar."""
    from dlmoe.experiments.common import seed_stats

    stats = seed_stats([r["routed_contribution"] for r in per_run])
    return {"routed_contribution": stats, "clears_bar": stats["mean"] >= MIN_ROUTED_CONTRIBUTION}
