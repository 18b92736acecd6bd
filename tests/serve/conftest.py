"""Tiny trained runs and an in-process server on an ephemeral loopback port (`httpx` clients)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'dlmoe[serve]')")

from dlmoe.config_io import load_run_config
from dlmoe.serve import BatchSettings, Engine, create_app
from dlmoe.serve.background import ServerThread
from dlmoe.train import Trainer
from tests.train.test_trainer import overrides


def train_tiny(tmp: Path, name: str, **extra: object) -> Path:
    """A 2-layer, 4-expert model trained for a few steps (enough that greedy argmaxes are not ties)."""
    settings = {"train.steps": 12, "model.max_seq_len": 64, "sample.gen_length": 16, "sample.block_length": 8,
                "sample.steps": 16} | extra  # fmt: skip
    config = load_run_config(None, overrides(tmp, name, **settings))
    return Trainer(config, progress=False).fit().run_dir


@pytest.fixture(scope="session")
def tc_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("serve_tc"), "tc")


@pytest.fixture(scope="session")
def ec_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("serve_ec"), "ec", **{"model.moe.router.kind": "expert_choice"})


@pytest.fixture(scope="session")
def tc_engine(tc_run: Path) -> Engine:
    return Engine.from_run(tc_run)


def serve(engine: Engine, **settings: object) -> ServerThread:
    """A started server for `engine` (stop it, or use it as a context manager)."""
    return ServerThread(create_app(engine, BatchSettings(**settings)), grace_s=5).start()


@pytest.fixture
def server(tc_engine: Engine) -> Iterator[ServerThread]:
    """The token-choice run served with batching on (max 16 rows, 20 ms wait)."""
    with serve(tc_engine, max_batch_rows=16, max_wait_ms=20) as running:
        yield running
