"""The diffusion transformer and its Hugging Face wrappers."""

from dlmoe.model.hf import DlmoeConfig, DlmoeForDiffusionLM
from dlmoe.model.transformer import DiffusionTransformer, ModelOutput, RMSNorm

__all__ = ["DiffusionTransformer", "DlmoeConfig", "DlmoeForDiffusionLM", "ModelOutput", "RMSNorm"]
