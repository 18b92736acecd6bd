"""Learning-rate schedules: linear warmup, then cosine, WSD (warmup-stable-decay) or constant."""

from __future__ import annotations

import math

import torch

from dlmoe.config import TrainConfig


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """Multiplier of the peak LR after `step` optimizer steps (floor: `min_lr_ratio`)."""
    warmup, total, floor = config.warmup_steps, config.steps, config.min_lr_ratio
    if warmup and step < warmup:
        return (step + 1) / warmup
    if config.lr_schedule == "constant":
        return 1.0
    if config.lr_schedule == "cosine":
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(config.decay_fraction * total))  # WSD: flat, then linear decay
    decay_start = total - decay_steps
    if step < decay_start:
        return 1.0
    return floor + (1 - floor) * max(0.0, 1 - (step - decay_start) / decay_steps)


def build_lr_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config))
