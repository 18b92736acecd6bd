"""Masked diffusion: forward noising and the ELBO loss (sampling lives in `dlmoe.sampling`)."""

from dlmoe.diffusion.loss import loss_by_mask_ratio_bin, masked_diffusion_loss
from dlmoe.diffusion.noise import NoisedBatch, add_mask_noise, sample_t

__all__ = [
    "NoisedBatch",
    "add_mask_noise",
    "loss_by_mask_ratio_bin",
    "masked_diffusion_loss",
    "sample_t",
]
