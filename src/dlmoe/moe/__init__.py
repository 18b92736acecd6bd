"""MoE feed-forward blocks: stacked experts, compute backends, the router → experts → combine layer."""

from dlmoe.moe.experts import BACKENDS, Experts, SwiGLU, swiglu_bmm, swiglu_grouped_mm, swiglu_loop
from dlmoe.moe.layer import MoELayer, MoEOutput, routed_experts_off

__all__ = [
    "BACKENDS",
    "Experts",
    "MoELayer",
    "MoEOutput",
    "SwiGLU",
    "swiglu_bmm",
    "swiglu_grouped_mm",
    "routed_experts_off",
    "swiglu_loop",
]
