"""Sampling from masked diffusion LMs: LLaDA blocks, Fast-dLLM threshold and KV caches, CFG,
left-padded batches, dMoE block routing and expert-choice capacity policies at inference.

`generate(model, prompt_ids, SamplerConfig(...))`. `dlmoe.config` imports this package (a run's
`sample` section is a `SamplerConfig`), so no module here imports `dlmoe.config` or `dlmoe.model`
at import time (types under TYPE_CHECKING, the model's helpers inside functions)."""

from dlmoe.sampling.canvas import Canvas, build_canvas
from dlmoe.sampling.config import CapacityPolicy, SamplerConfig
from dlmoe.sampling.generate import GenerationResult, StepInfo, generate
from dlmoe.sampling.rules import (
    REMASKING_RULES,
    commit_schedule,
    finished_at_eos,
    propose_tokens,
    select_commits,
    suppress_commits,
    suppress_logits,
    threshold_commits,
)
from dlmoe.sampling.stats import GenerationStats
from dlmoe.sampling.step_routing import StepRouting
from dlmoe.vocab import CACHE_MODES

__all__ = [
    "CACHE_MODES",
    "REMASKING_RULES",
    "Canvas",
    "CapacityPolicy",
    "GenerationResult",
    "GenerationStats",
    "SamplerConfig",
    "StepInfo",
    "StepRouting",
    "build_canvas",
    "commit_schedule",
    "finished_at_eos",
    "generate",
    "propose_tokens",
    "select_commits",
    "suppress_commits",
    "suppress_logits",
    "threshold_commits",
]
