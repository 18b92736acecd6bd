"""Masked diffusion: forward noising, the ELBO loss, and the LLaDA sampler."""

from dlmoe.diffusion.loss import loss_by_mask_ratio_bin, masked_diffusion_loss
from dlmoe.diffusion.noise import NoisedBatch, add_mask_noise, sample_t
from dlmoe.diffusion.sampler import REMASKING_RULES, GenerationResult, StepInfo, generate

__all__ = [
    "REMASKING_RULES",
    "GenerationResult",
    "NoisedBatch",
    "StepInfo",
    "add_mask_noise",
    "generate",
    "loss_by_mask_ratio_bin",
    "masked_diffusion_loss",
    "sample_t",
]
