"""Short fine-tunes of one finished run, measured before the first step and after the last.

Shared by `learning-efficiency` and `retrofit`. Three things `dlmoe finetune` does not give:
  1. the validation ELBO (and per-bin CE) *before* the first step — the starting point of a probe;
  2. the number of loss-bearing (masked) training tokens actually drawn, and the range of t drawn;
  3. replicate seeds that change the batch order and the noise but nothing else: the split follows
     `data.split_seed` (never `train.seed`), and a probe also keeps the source's `train.seed` (its
     initialisation-free fine-tune needs no other) and re-seeds only the batch iterator and the
     noise generator (`REPLICATE_SEED_OFFSET + replicate`), streams the source run never drew.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dlmoe.config import RunConfig
from dlmoe.config_io import load_run_config, run_config_to_dict
from dlmoe.experiments.common import Scale, metrics_rows, scale_overrides, variant_config
from dlmoe.train import Trainer
from dlmoe.train.init_from import SourceRun

REPLICATE_SEED_OFFSET = 1000  # replicate streams stay clear of a base run's own (seed, seed + 1)


def base_run(
    given: str | None,
    out: Path,
    scale: Scale,
    corpus: str,
    variant: dict[str, Any],
    *,
    scaling_factor: bool,
    name: str = "--base-run",
) -> tuple[SourceRun, bool]:
    """(the run to start from, whether it was trained here): `given`, or a run trained at `scale` in `out/base`."""
    if given is not None:
        return SourceRun.open(given, name=name), False
    run_dir = out / "base"
    config = variant_config(
        scale_overrides(scale, run_dir, corpus, out / ".cache", scaling_factor=scaling_factor), variant
    )
    Trainer(config, progress=False).fit()
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # model/ is what fine-tunes read
    return SourceRun.open(run_dir), True


def probe_config(source: SourceRun, run_dir: Path, overrides: dict[str, Any]) -> RunConfig:
    """The source's config, then `overrides`; starts from the source's weights, keeps its data split."""
    base = run_config_to_dict(source.config)
    cache = source.config.data.cache_dir or str(source.path.resolve().parent / ".cache")  # what the source used
    fixed = {"run_dir": str(run_dir), "train.init_from": str(source.path), "data.cache_dir": cache}
    merged = {**overrides, **fixed}
    return load_run_config(None, [f"{k}={'null' if v is None else v}" for k, v in merged.items()], base=base)


def probe_overrides(scale: Scale, steps: int, lr: float, eval_every: int) -> dict[str, Any]:
    """Training settings every probe shares: constant LR, no warmup, one checkpoint at the end."""
    return {
        "train.steps": steps,
        "train.lr": lr,
        "train.lr_schedule": "constant",
        "train.warmup_steps": 0,
        "train.batch_size": scale.batch_size,
        "train.eval_every": eval_every,
        "train.eval_batches": scale.eval_batches,
        "train.log_every": 1,
        "train.checkpoint_every": steps,
        "train.keep_last": 1,
        "train.device": scale.device,
    }


class ProbeTrainer(Trainer):
    """A `Trainer` re-seeded for `replicate` that counts the masked training tokens it draws."""

    def __init__(self, config: RunConfig, replicate: int) -> None:
        super().__init__(config, progress=False)
        seed = REPLICATE_SEED_OFFSET + replicate
        batches = self.data.train_batches
        batches.load_state_dict(batches.state_dict() | {"seed": seed, "epoch": 0, "position": 0})
        self.noise_generator.manual_seed(seed)
        self.replicate = replicate
        self.masked_tokens = 0
        self.noised_tokens = 0
        self.t_drawn = [math.inf, -math.inf]  # [min, max] of the training noise levels t
        self.mask_ratio_sum = 0.0  # Σ realized r_b over training rows
        self.rows_drawn = 0

    def _loss(self, batch, generator, weighting=None, *, validation=False):  # type: ignore[override]
        result = super()._loss(batch, generator, weighting, validation=validation)
        if not validation:
            noised = result[3]
            self.masked_tokens += int(noised.masked.sum())
            self.noised_tokens += noised.masked.numel()
            self.t_drawn = [min(self.t_drawn[0], float(noised.t.min())), max(self.t_drawn[1], float(noised.t.max()))]
            self.mask_ratio_sum += float(noised.mask_ratio.sum())
            self.rows_drawn += noised.mask_ratio.numel()
        return result

    def evaluate_bins(self) -> dict[str, Any]:
        """Validation ELBO now, with the per-bin CE `evaluate()` writes to val_bins.json."""
        val = self.evaluate()
        return {"val_loss": val["val_loss"], "bins": read_bins(self.run_dir)}


@dataclass
class ProbeResult:
    """What one probe measured (losses in nats per token; `bins` as in val_bins.json)."""

    run_dir: Path
    replicate: int
    steps: int
    before: dict[str, Any] | None  # {"val_loss", "bins"} before the first step (None: not measured)
    after: dict[str, Any]  # the same after the last step
    masked_tokens: int  # loss-bearing training tokens drawn
    tokens: int  # all training tokens fed
    t_drawn: list[float]  # [min, max] of the training t
    mean_mask_ratio: float  # mean realized r over the training rows
    rows: list[dict[str, float]] = field(repr=False)  # metrics.csv (see common.metrics_rows)


def run_probe(trainer: ProbeTrainer, *, measure_before: bool, keep_model: bool = False) -> ProbeResult:
    """Fit `trainer` (measuring first where asked); delete its checkpoints (and model/ unless kept)."""
    before = trainer.evaluate_bins() if measure_before else None
    summary = trainer.fit()
    after = {"val_loss": summary.val_loss, "bins": read_bins(trainer.run_dir)}
    shutil.rmtree(trainer.run_dir / "checkpoints", ignore_errors=True)  # probes are measured, not resumed
    if not keep_model:
        shutil.rmtree(trainer.run_dir / "model", ignore_errors=True)
    return ProbeResult(
        run_dir=trainer.run_dir,
        replicate=trainer.replicate,
        steps=trainer.step,
        before=before,
        after=after,
        masked_tokens=trainer.masked_tokens,
        tokens=trainer.noised_tokens,
        t_drawn=trainer.t_drawn,
        mean_mask_ratio=trainer.mask_ratio_sum / max(trainer.rows_drawn, 1),
        rows=metrics_rows(trainer.run_dir),
    )


def read_bins(run_dir: Path) -> list[dict[str, Any]]:
    return json.loads((run_dir / "val_bins.json").read_text())["bins"]
