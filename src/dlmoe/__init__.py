"""dlmoe: Mixture-of-Experts masked diffusion language models in PyTorch."""

__version__ = "0.1.0"


def __getattr__(name: str):  # `dlmoe.generate` without importing torch at `import dlmoe`
    if name == "generate":
        from dlmoe.sampling import generate

        return generate
    raise AttributeError(f"module 'dlmoe' has no attribute {name!r}")
