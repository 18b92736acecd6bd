"""Training: the loop, LR schedules, atomic checkpoints, metrics."""

from dlmoe.train.trainer import Trainer, TrainingError, TrainSummary

__all__ = ["TrainSummary", "Trainer", "TrainingError"]
