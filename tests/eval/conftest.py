"""Tiny models and a tiny trained run shared by the evaluation tests."""

from pathlib import Path

import pytest
import torch

from dlmoe.config import ModelConfig, MoEConfig, RouterConfig
from dlmoe.config_io import load_run_config
from dlmoe.model.transformer import DiffusionTransformer
from dlmoe.train import Trainer
from tests.train.test_trainer import overrides


def tiny_model(kind: str = "token_choice", seed: int = 0, **extra: object) -> DiffusionTransformer:
    """Random weights, 2 layers, vocab 23; init_std large enough that logits differ clearly per token."""
    torch.manual_seed(seed)
    router = RouterConfig(kind=kind, num_experts=4, num_experts_per_tok=2)
    config = ModelConfig(
        vocab_size=23, dim=16, num_layers=2, num_heads=2, max_seq_len=24, dense_hidden=32,
        moe=MoEConfig(router=router, expert_hidden=16), mask_id=0, eos_id=1, pad_id=2, init_std=0.3,
        **extra,
    )  # fmt: skip
    return DiffusionTransformer(config).eval()


@pytest.fixture(scope="package")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained for a few steps on the trainer tests' toy corpus (seq_len 32, max_seq_len 64)."""
    tmp = tmp_path_factory.mktemp("eval_run")
    config = load_run_config(None, overrides(tmp, "tc", **{"train.steps": 4, "model.max_seq_len": 64}))
    return Trainer(config, progress=False).fit().run_dir
