"""The allowed values of every string option, in one leaf module.

Configs validate against these tuples and the implementations key their registries by them, so
the two can never drift; this module imports nothing from dlmoe (no config ↔ routing cycle).
Each `Literal` type names the same values as its tuple (`typing.get_args(Gate) == GATES`), so
annotations and run-time checks read from one place.
"""

from __future__ import annotations

from typing import Literal, get_args

# --- routing (dlmoe.routing)
RouterKind = Literal["token_choice", "expert_choice"]
ScoreFunction = Literal["softmax", "sigmoid"]  # token choice: router score of the logits
Pool = Literal["sequence", "batch"]  # expert choice: which tokens an expert ranks
Select = Literal["logit", "score"]  # expert choice: rank tokens by raw logit or by softmax score
Gate = Literal["restricted", "full", "restricted_sigmoid"]  # expert choice: a token's gate weights
CapacitySchedule = Literal[
    "constant",
    "linear",
    "linear_reverse",
    "cosine",
    "cosine_reverse",
    "gaussian",
    "gaussian_reverse",
    "bell",
]  # expert choice: k as a function of the mask ratio (dlmoe.routing.schedules)
ExpertBackend = Literal["auto", "loop", "bmm", "grouped_mm"]  # dlmoe.moe.experts

# --- model, training
Attention = Literal["bidirectional", "block_causal"]
LossWeighting = Literal["elbo", "stable", "masked_mean"]  # dlmoe.diffusion.loss
LrSchedule = Literal["cosine", "wsd", "constant"]
Precision = Literal["auto", "bf16", "fp32"]  # dlmoe.precision
DeviceName = Literal["auto", "cpu", "cuda"]

# --- sampling (dlmoe.sampling)
Remasking = Literal["low_confidence", "random"]
CacheMode = Literal["none", "prefix", "dual", "exact"]

# --- parallelism (dlmoe.parallel)
DataParallel = Literal["ddp", "fsdp"]
EcPool = Literal["local", "group"]
DistBackend = Literal["auto", "gloo", "nccl"]

ROUTER_KINDS: tuple[str, ...] = get_args(RouterKind)
SCORE_FUNCTIONS: tuple[str, ...] = get_args(ScoreFunction)
POOLS: tuple[str, ...] = get_args(Pool)
SELECT: tuple[str, ...] = get_args(Select)
GATES: tuple[str, ...] = get_args(Gate)
SCHEDULE_NAMES: tuple[str, ...] = get_args(CapacitySchedule)
EXPERT_BACKENDS: tuple[str, ...] = get_args(ExpertBackend)
ATTENTION_KINDS: tuple[str, ...] = get_args(Attention)
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)
LR_SCHEDULES: tuple[str, ...] = get_args(LrSchedule)
PRECISIONS: tuple[str, ...] = get_args(Precision)
DEVICE_NAMES: tuple[str, ...] = get_args(DeviceName)
REMASKING: tuple[str, ...] = get_args(Remasking)
CACHE_MODES: tuple[str, ...] = get_args(CacheMode)
DATA_PARALLEL: tuple[str, ...] = get_args(DataParallel)
EC_POOLS: tuple[str, ...] = get_args(EcPool)
DIST_BACKENDS: tuple[str, ...] = get_args(DistBackend)
