"""Fine-tuning a finished run (train.init_from / `dlmoe finetune`): dMoE block routing in the forward pass."""

import csv
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

from dlmoe.cli import main
from dlmoe.config import BlockRoutingConfig, RouterConfig
from dlmoe.config_io import load_run_config, run_config_to_dict
from dlmoe.model.hf import DlmoeForDiffusionLM
from dlmoe.routing.routers import build_router
from dlmoe.train import Trainer
from tests.train.test_trainer import losses, overrides

TINY = {"train.steps": 2, "train.eval_every": 2, "train.eval_batches": 1, "train.checkpoint_every": 2}
BLOCK = ["model.moe.router.block.block_size=8", "model.moe.router.block.top_p=0.6", "model.moe.router.block.guard=4"]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2-step token-choice run (4 experts, top-2)."""
    tmp = tmp_path_factory.mktemp("source")
    Trainer(load_run_config(None, overrides(tmp, "src", **TINY)), progress=False).fit()
    return tmp / "src"


def finetune(source: Path, run_dir: Path, *extra: str) -> int:
    return main(["finetune", "--from", str(source), "--no-progress", *BLOCK, f"run_dir={run_dir}", *extra])


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


def test_dotted_keys_create_block_routing_with_defaults() -> None:
    config = load_run_config(None, ["model.moe.router.block.top_p=0.5", "model.moe.router.block.guard=4"])
    assert config.model.moe.router.block == BlockRoutingConfig(block_size=32, top_p=0.5, guard=4)


def test_finetune_starts_from_the_source_weights_with_block_routing(source: Path, tmp_path: Path) -> None:
    overrides_ = [*BLOCK, f"run_dir={tmp_path / 'ft'}", f"train.init_from={source}"]
    config = load_run_config(None, overrides_, base=json.loads((source / "config.json").read_text()))
    trainer = Trainer(config, progress=False)
    loaded = trainer.model.state_dict()
    reference = DlmoeForDiffusionLM.from_pretrained(source / "model").state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)  # the weights before the first step
    assert trainer.step == 0 and not trainer.optimizer.state  # fresh optimizer
    batch = trainer.data.validation_batches[0]
    out = trainer.model(batch, mask_ratio=torch.full((batch.shape[0],), 0.5))
    assert all(d.coreset_mask is not None for d in out.dispatches)  # block routing in the forward pass
    assert math.isfinite(trainer.train_step()["loss"])


def test_finetune_cli_writes_a_normal_block_routed_run_that_resumes_exactly(source: Path, tmp_path: Path) -> None:
    run = tmp_path / "ft"
    extra = [
        "train.steps=4",
        "train.mask_ratio_min=0.3",
        "train.mask_ratio_max=0.8",
        "train.loss_weighting=masked_mean",
    ]
    assert finetune(source, run, *extra) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["moe"]["router"]["block"] == {"block_size": 8, "top_p": 0.6, "guard": 4}
    assert saved["train"]["init_from"] == str(source)
    assert saved["data"] == json.loads((source / "config.json").read_text())["data"]  # same data pipeline
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == (source / "tokenizer" / "tokenizer.json").read_bytes()
    rows = losses(run)
    assert [r[0] for r in rows] == ["1", "2", "3", "4"] and all(math.isfinite(float(r[1])) for r in rows)
    with (run / "metrics.csv").open() as f:
        assert all(math.isfinite(float(r["val_loss"])) for r in csv.DictReader(f) if r["val_loss"])
    # the saved model reloads with block routing on (top_p, guard kept)
    model = DlmoeForDiffusionLM.from_pretrained(run / "model")
    assert model.config.to_model_config().moe.router.block == BlockRoutingConfig(block_size=8, top_p=0.6, guard=4)
    # resume repeats the losses, without reading the source again
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    assert finetune(source, run, *extra, "--resume") == 0
    assert losses(run) == rows


def test_finetune_bad_input_is_one_clear_error_and_writes_nothing(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = snapshot(source)
    cases = [
        (tmp_path / "missing", tmp_path / "a", [], "not a run folder"),
        (source, tmp_path / "b", ["model.dim=64"], r"model\.dim=64 differs .* model\.dim=32"),
        (source, tmp_path / "c", ["model.moe.router.num_experts=8"], r"num_experts=8 differs .*num_experts=4"),
        (source, source, [], "is the source run"),
        (source, tmp_path / "d", ["model.moe.router.block.guard=5"], r"guard must be <= router\.num_experts=4, got 5"),
    ]
    for src, run, extra, match in cases:
        assert finetune(src, run, *extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("dlmoe: error:") and err.count("\n") == 1
        assert re.search(match, err), err
        if run != source:
            assert not run.exists()
    assert snapshot(source) == before  # the source run is untouched


def test_finetune_may_switch_the_loss_free_expert_bias_on(source: Path, tmp_path: Path) -> None:
    base = json.loads((source / "config.json").read_text())
    config = load_run_config(None, [f"run_dir={tmp_path / 'bias'}", "model.moe.router.expert_bias=true"], base=base)
    config.train.init_from = str(source)
    state = Trainer(config, progress=False).model.state_dict()
    biases = [v for k, v in state.items() if k.endswith("expert_bias")]
    assert biases and all(not b.any() for b in biases)  # started at zero; everything else loaded
    reference = DlmoeForDiffusionLM.from_pretrained(source / "model").state_dict()
    assert all(torch.equal(state[k], v) for k, v in reference.items())


def test_train_init_from_refuses_an_architecture_change(source: Path, tmp_path: Path) -> None:
    config = load_run_config(None, overrides(tmp_path, "ft", **TINY, **{"model.moe.expert_hidden": 16}))
    config.train.init_from = str(source)
    with pytest.raises(ValueError, match=r"model\.moe\.expert_hidden=16 differs .*=32"):
        Trainer(config, progress=False)
    assert not (tmp_path / "ft").exists()


def _expert_choice_block_routing_available() -> bool:
    config = RouterConfig(
        kind="expert_choice", num_experts=4, num_experts_per_tok=2, block=BlockRoutingConfig(block_size=4, guard=2)
    )
    try:
        dispatch = build_router(config, 8)(torch.randn(1, 8, 8), mask_ratio=torch.tensor([0.5]))
    except (NotImplementedError, ValueError):
        return False
    return dispatch.coreset_mask is not None


@pytest.mark.skipif(not _expert_choice_block_routing_available(), reason="expert-choice block routing not built yet")
def test_finetune_with_expert_choice_block_routing(source: Path, tmp_path: Path) -> None:
    run = tmp_path / "ec"
    assert finetune(source, run, "model.moe.router.kind=expert_choice", "train.steps=2") == 0
    assert all(math.isfinite(float(loss)) for _, loss in losses(run))
    model = DlmoeForDiffusionLM.from_pretrained(run / "model")
    config = model.config.to_model_config()
    assert config.moe.router.kind == "expert_choice" and config.moe.router.block.top_p == 0.6
    out = model(torch.randint(3, config.vocab_size, (2, 16)), mask_ratio=torch.tensor([0.3, 0.7]))
    assert all(d.coreset_mask is not None for d in out.dispatches)  # EC inside each block's coreset


def test_the_bundled_finetune_config_applies_to_the_token_choice_baseline() -> None:
    configs = Path(__file__).parents[2] / "configs"
    base = run_config_to_dict(load_run_config(configs / "tc_aux.yaml"))
    config = load_run_config(configs / "dmoe_finetune.yaml", base=base)
    assert config.model.moe.router.block == BlockRoutingConfig(block_size=32, top_p=0.6, guard=4)
    assert (config.train.mask_ratio_min, config.train.mask_ratio_max) == (0.3, 0.8)
    assert config.model.dim == 256 and config.data.corpus == "shakespeare"  # the rest is the source's
