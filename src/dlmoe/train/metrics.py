"""Training metrics: per-step rows to CSV (and TensorBoard when installed), a loss plot PNG.

The CSV is the record a resumed run continues: rows after the checkpoint step are dropped on
resume, so an interrupted-and-resumed run leaves the same file as an uninterrupted one.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from dlmoe.routing.dispatch import Dispatch

COLUMNS = [
    "step", "loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "step_s", "active_flops_per_token",
    "load_max_over_mean", "dropped_fraction", "zero_expert_fraction", "experts_per_token",
    "val_loss", "val_bits_per_byte",
]  # fmt: skip


def routing_summary(dispatches: list[Dispatch]) -> dict[str, float]:
    """Mean over MoE layers of the load-balance figures (NaN for a dense model)."""
    if not dispatches:
        keys = ("load_max_over_mean", "dropped_fraction", "zero_expert_fraction", "experts_per_token")
        return dict.fromkeys(keys, math.nan)
    stats = [d.stats() for d in dispatches]
    n = len(stats)
    return {
        "load_max_over_mean": sum(s.load_max_over_mean for s in stats) / n,
        "dropped_fraction": sum(s.dropped_fraction for s in stats) / n,
        "zero_expert_fraction": sum(s.zero_expert_fraction for s in stats) / n,
        "experts_per_token": sum(s.experts_per_token_mean for s in stats) / n,
    }


class MetricsLog:
    """Appends rows to `<run_dir>/metrics.csv`; mirrors scalars to TensorBoard if available."""

    def __init__(self, run_dir: Path, *, resume_step: int | None = None) -> None:
        self.path = run_dir / "metrics.csv"
        if resume_step is None or not self.path.exists():
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(COLUMNS)
        else:
            self._truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional at run time
            self.writer = None

    def _truncate_after(self, step: int) -> None:
        with self.path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict[str, float]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerow({k: row.get(k, "") for k in COLUMNS})
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, float | int) and not math.isnan(value):
                    self.writer.add_scalar(key, value, int(row["step"]))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def plot_losses(metrics_csv: Path, out_png: Path) -> None:
    """Training loss per step and validation loss where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_csv)
    steps = [int(r["step"]) for r in rows if r["loss"]]
    losses = [float(r["loss"]) for r in rows if r["loss"]]
    val = [(int(r["step"]), float(r["val_loss"])) for r in rows if r["val_loss"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, losses, label="train ELBO loss")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation ELBO loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
