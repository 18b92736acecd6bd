"""`dlmoe experiment block-routing` at a tiny scale: the Pareto sweep, fine-tunes, reports, and the doc section."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import dlmoe.experiments.common as common
from dlmoe.config import BlockRoutingConfig
from dlmoe.experiments import ExperimentArgs
from dlmoe.experiments import block_routing as experiment
from dlmoe.model import DiffusionTransformer
from dlmoe.routing.routers import Router, block_routing


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch, tiny_scale, corpus: Path) -> str:
    """The shared tiny scale with 8 experts (guard = 2k = 4 < E), a short sweep, one noise draw."""
    monkeypatch.setitem(common.SCALES, "tiny", dataclasses.replace(tiny_scale, num_experts=8, seq_len=64))
    monkeypatch.setattr(experiment, "TOP_PS", (0.2, 0.8))
    monkeypatch.setattr(experiment, "FINETUNE_TOP_PS", (0.5,))
    monkeypatch.setattr(experiment, "NOISE_DRAWS", 1)
    return str(corpus)


def test_block_routing_experiment_writes_the_pareto_report(tiny: str, tmp_path: Path) -> None:
    mcq = tmp_path / "q.jsonl"
    mcq.write_text(json.dumps({"question": "Who speaks?", "choices": ["king", "queen"], "answer": 0}) + "\nnot json\n")
    doc = tmp_path / "results.md"
    args = ExperimentArgs(out=tmp_path / "out", scale_name="tiny", corpus=tiny, mcq=(str(mcq),), results_doc=str(doc))
    results = experiment.run(args)
    curves = results["curves"]
    assert list(curves) == ["training-free", "fine-tuned (token routing)", "fine-tuned (top_p=0.5)"]
    for points in curves.values():
        assert [p["top_p"] for p in points] == [None, 0.2, 0.8]
        token, low, high = points
        # block routing never uses more experts per block than token routing; a smaller top-p never more than a larger
        assert low["unique_experts_per_block"] <= high["unique_experts_per_block"] + 1e-9
        assert high["unique_experts_per_block"] <= token["unique_experts_per_block"] + 1e-9
        assert all(p["acc_q"] in (0.0, 1.0) for p in points)
    assert results["mcq_skipped_lines"] == {"q": 1}
    out = tmp_path / "out"
    for name in ("experiment.json", "results.json", "results.md", "provenance.json"):
        assert (out / name).stat().st_size > 0
    assert (doc.parent / "results" / "block-routing" / "pareto.png").stat().st_size > 0  # drawn from the raw data
    assert json.loads((out / "results.json").read_text())["guard"] == 4
    # the fine-tuned run routes by blocks in training and saves that choice
    saved = json.loads((out / "ft_top_p_0.5" / "config.json").read_text())["model"]["moe"]["router"]["block"]
    assert saved["top_p"] == 0.5 and saved["guard"] == 4
    # rerun: refused without --overwrite; with it, the doc section is replaced, not duplicated
    with pytest.raises(ValueError, match="already holds a run"):
        experiment.run(args)
    experiment.run(dataclasses.replace(args, overwrite=True))
    assert doc.read_text().count("<!-- experiment:block-routing -->") == 1


def test_refuses_an_expert_choice_base_and_missing_mcq_files(tiny: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--mcq file"):
        experiment.run(ExperimentArgs(out=tmp_path / "a", scale_name="tiny", mcq=(str(tmp_path / "none.jsonl"),)))
    assert not (tmp_path / "a").exists()  # nothing written on bad input


def test_block_routing_context_manager_restores_each_router() -> None:
    from dlmoe.config import ModelConfig, MoEConfig, RouterConfig

    router = RouterConfig(num_experts=4, num_experts_per_tok=2)
    moe = MoEConfig(router=router, expert_hidden=8)
    config = ModelConfig(vocab_size=32, dim=16, num_layers=2, num_heads=2, max_seq_len=16, dense_hidden=16, moe=moe)
    model = DiffusionTransformer(dataclasses.replace(config, mask_id=31))
    routers = [m for m in model.modules() if isinstance(m, Router)]
    block = BlockRoutingConfig(block_size=4, top_p=0.1, guard=2)
    with block_routing(model, block):
        assert all(r.block is block for r in routers)
        out = model(torch.randint(0, 31, (1, 8)))
        assert all(d.coreset_mask is not None for d in out.dispatches)
    assert all(r.block is None for r in routers)
