"""Masked diffusion: forward noising, the ELBO loss, the objective (noise → forward → loss) and the
validation ELBO evaluator (sampling lives in `dlmoe.sampling`)."""

from dlmoe.diffusion.bounds import bits_per_byte, perplexity_bound
from dlmoe.diffusion.loss import DiffusionLoss, loss_by_mask_ratio_bin, masked_diffusion_loss
from dlmoe.diffusion.noise import NoisedBatch, add_mask_noise, sample_t
from dlmoe.diffusion.objective import ObjectiveOutput, diffusion_loss
from dlmoe.diffusion.validation import NUM_BINS, VALIDATION_SEED, ValidationElbo, validation_elbo

__all__ = [
    "NUM_BINS",
    "VALIDATION_SEED",
    "DiffusionLoss",
    "NoisedBatch",
    "ObjectiveOutput",
    "ValidationElbo",
    "add_mask_noise",
    "bits_per_byte",
    "diffusion_loss",
    "loss_by_mask_ratio_bin",
    "masked_diffusion_loss",
    "perplexity_bound",
    "sample_t",
    "validation_elbo",
]
