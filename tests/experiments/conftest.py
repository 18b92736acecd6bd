"""A tiny scale and corpus so an experiment runs end to end in seconds (the real defaults are not tests)."""

from pathlib import Path

import pytest
import torch

from dlmoe.experiments import SCALES, ExperimentArgs, Scale

TINY = Scale(
    dim=32,
    num_layers=1,
    num_heads=2,
    num_experts=4,
    experts_per_token=2,
    expert_hidden=32,
    seq_len=32,
    batch_size=4,
    steps=3,
    eval_every=1,
    eval_batches=1,
    vocab_size=300,
    device="cpu",
)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 short documents: enough for a validation split at 5 % (documents are split, not text)."""
    folder = tmp_path_factory.mktemp("corpus")
    for i in range(60):
        lines = [
            f"Scene {i}.{j}: the king speaks of stars and seas; the queen answers with {j % 7} roses." for j in range(8)
        ]
        (folder / f"doc{i}.txt").write_text("\n".join(lines))
    return folder


@pytest.fixture(scope="module")
def tiny_scale():
    """Registers the tiny scale; one thread (the tiny matmuls gain nothing from more) and no per-run loss plot."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SCALES, "tiny", TINY)
        mp.setattr("dlmoe.train.trainer.plot_losses", lambda *a, **k: None)
        yield TINY
    torch.set_num_threads(threads)


def make_args(out: Path, corpus: Path, **kwargs) -> ExperimentArgs:
    """ExperimentArgs at the tiny scale (1 seed unless given)."""
    return ExperimentArgs(out=out, scale_name="tiny", corpus=str(corpus), **{"seeds": 1} | kwargs)


@pytest.fixture
def tiny_args(monkeypatch: pytest.MonkeyPatch, corpus: Path, tmp_path: Path):
    """Factory `tiny_args(out_name, **options)`: ExperimentArgs at the tiny scale writing under tmp_path."""
    monkeypatch.setitem(SCALES, "tiny", TINY)

    def make(out: str = "out", **kwargs) -> ExperimentArgs:
        return make_args(tmp_path / out, corpus, **kwargs)

    return make
