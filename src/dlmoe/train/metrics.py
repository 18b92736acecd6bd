"""Training metrics: per-step rows to CSV (and TensorBoard when installed), a loss plot PNG.

The CSV is the record a resumed run continues: rows after the checkpoint step are dropped on
resume, so an interrupted-and-resumed run leaves the same file as an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from dlmoe._fs import atomic_write, atomic_write_text
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
            atomic_write_text(self.path, _csv_text([]))
        else:
            self._truncate_after(resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional at run time
            self.writer = None

    def _truncate_after(self, step: int) -> None:
        """Keep the rows up to the checkpoint `step`; rewritten atomically (a kill keeps the old file)."""
        rows = [r for r in read_metrics(self.path) if int(r["step"]) <= step]
        atomic_write_text(self.path, _csv_text(rows))

    def write(self, row: dict[str, float]) -> None:
        """Append one row in a single write (a kill can cut only this row, which readers skip)."""
        line = _csv_text([{k: row.get(k, "") for k in COLUMNS}], header=False)
        with self.path.open("a", newline="") as f:
            f.write(line)
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, float | int) and not math.isnan(value):
                    self.writer.add_scalar(key, value, int(row["step"]))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def last_loss(self) -> float:
        """The last training loss recorded (NaN when there is none)."""
        losses = [float(r["loss"]) for r in read_metrics(self.path) if r["loss"]]
        return losses[-1] if losses else math.nan


def _csv_text(rows: list[dict], *, header: bool = True) -> str:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, COLUMNS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def read_metrics(path: Path) -> list[dict[str, str]]:
    """The complete rows of a metrics CSV: a last line cut short by a kill (no newline, or missing
    fields) is skipped, never misread."""
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    return [r for r in rows if None not in r.values() and None not in r and r["step"].isdigit()]


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
    atomic_write(out_png, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
