"""dlmoe: Mixture-of-Experts masked diffusion language models in PyTorch."""

__version__ = "0.1.0"
