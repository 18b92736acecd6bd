"""`dlmoe experiment block-routing` at a tiny scale: dMoE's metric over real generations, agreement, the
paired ELBO change, the top-p × guard sweep, the p_train × p_test grid, verdicts and the report."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import dlmoe.experiments.common as common
from dlmoe.config import BlockRoutingConfig, ModelConfig, MoEConfig, RouterConfig
from dlmoe.config_io import save_run_config
from dlmoe.experiments import ExperimentArgs
from dlmoe.experiments import block_routing as experiment
from dlmoe.experiments.raw_data import committed_sections, render_doc, section
from dlmoe.experiments.report_block_routing import render
from dlmoe.model import DiffusionTransformer
from dlmoe.routing.routers import Router, block_routing
from dlmoe.sampling import SamplerConfig, generate


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch, tiny_scale, corpus: Path) -> str:
    """The shared tiny scale with 8 experts (guards k, 2k, 4k = 2, 4, 8 = E), a short sweep, 4 short
    generations (the tiny validation split holds 4 rows), two noise draws."""
    monkeypatch.setitem(common.SCALES, "tiny", dataclasses.replace(tiny_scale, num_experts=8, seq_len=64))
    monkeypatch.setattr(experiment, "TOP_PS", (0.2, 0.5, 1.0))
    monkeypatch.setattr(experiment, "FINETUNE_TOP_PS", (0.5,))
    monkeypatch.setattr(experiment, "CLAIM_TOP_P", 0.5)
    monkeypatch.setattr(experiment, "NOISE_DRAWS", 2)
    monkeypatch.setattr(experiment, "PROMPT_LENGTH", 16)
    monkeypatch.setattr(experiment, "GEN_LENGTH", 32)
    return str(corpus)


def _assert_same_as_token_routing(point: dict, token: dict) -> None:
    """Block routing that keeps every expert a token could pick is token routing, bit for bit."""
    assert point["agreement"] == 1.0 and point["agreement_per_prompt"] == [1.0] * len(token["agreement_per_prompt"])
    assert point["elbo_items"] == token["elbo_items"] and point["elbo_change"] == 0.0
    assert point["unique_experts_per_prompt"] == token["unique_experts_per_prompt"]


def test_block_routing_experiment_measures_the_papers_metrics(tiny: str, tmp_path: Path) -> None:
    mcq = tmp_path / "q.jsonl"
    mcq.write_text(json.dumps({"question": "Who speaks?", "choices": ["king", "queen"], "answer": 0}) + "\nnot json\n")
    doc = tmp_path / "results.md"
    args = ExperimentArgs(out=tmp_path / "out", scale_name="tiny", corpus=tiny, mcq=(str(mcq),), results_doc=str(doc))
    results = experiment.run(args)
    assert list(results["models"]) == ["base", "ft_token", "ft_top_p_0.5"]
    assert results["guards"] == [2, 4, 8] and results["guard"] == 4 and results["num_experts"] == 8
    points = results["points"]
    assert len(points) == 1 + 3 * 3 + 2 * (1 + 3)  # base: token + top-p × guard; fine-tunes: token + top-p
    for p in points:
        token = next(q for q in points if q["model"] == p["model"] and q["top_p"] is None)
        n = len(p["unique_experts_per_prompt"])
        assert n == 4 and len(p["elbo_items"]) == results["elbo_items"] == 2
        assert p["unique_experts"] == pytest.approx(sum(p["unique_experts_per_prompt"]) / n)
        assert 1 <= p["unique_experts"] <= 8 and 0 <= p["agreement"] <= 1 and p["acc_q"] in (0.0, 1.0)
        if p["top_p"] is None or p["top_p"] == 1.0 or p["guard"] == 8:  # guard = E or top-p = 1: the identity
            _assert_same_as_token_routing(p, token)
    base_token = points[0]
    assert base_token["model"] == "base" and base_token["elbo_change_base"] == 0.0
    # the grid: one row per model, one cell per p_test (token routing first)
    grid = results["grid"]
    assert grid["p_test"] == [None, 0.2, 0.5, 1.0]
    assert [r["label"] for r in grid["rows"]] == ["training-free", "token routing (control)", "p_train=0.5"]
    assert all([c["p_test"] for c in r["cells"]] == grid["p_test"] for r in grid["rows"])
    assert set(results["summary"]["verdicts"]) == {
        "fewer_experts/base", "quality/base", "fewer_experts/ft_top_p_0.5", "quality/ft_top_p_0.5",
        "finetune/ft_top_p_0.5",
    }  # fmt: skip
    assert results["controls"]["base"][0]["seed"] == 0 and results["mcq_skipped_lines"] == {"q": 1}
    out = tmp_path / "out"
    for name in ("experiment.json", "results.json", "results.md", "provenance.json"):
        assert (out / name).stat().st_size > 0
    # the fine-tuned run routes by blocks in training and saves that choice
    saved = json.loads((out / "runs" / "ft_top_p_0.5" / "config.json").read_text())["model"]["moe"]["router"]["block"]
    assert saved["top_p"] == 0.5 and saved["guard"] == 4
    _check_report(doc, args)


def _check_report(doc: Path, args: ExperimentArgs) -> None:
    """The report is rendered from the archived raw data alone, the same twice, with its verdicts."""
    raw = doc.parent / "results" / "block-routing"
    first, second = render(raw), render(raw)
    assert first.markdown == second.markdown and first.series == second.series
    assert committed_sections(doc)["block-routing"] == section("block-routing", first, doc)
    assert json.loads((raw / "plots.json").read_text()) == json.loads(json.dumps(first.series))
    assert (raw / "experts_vs_quality.png").stat().st_size > 0
    text = first.markdown
    assert "Routed-experts-off control" in text and "not measured" not in text
    assert text.count("\n- **") == 5 and "4 prompts)" in text and "2 batch × draw items)" in text
    assert "p_train \\ p_test" in text and "| p_train=0.5 |" in text
    # rerun: refused without --overwrite; re-rendering replaces the doc section, never duplicates it
    with pytest.raises(ValueError, match="already holds a run"):
        experiment.run(args)
    render_doc(doc, only=["block-routing"])
    assert doc.read_text().count("<!-- experiment:block-routing -->") == 1


def _expert_choice_run(folder: Path, tiny_corpus: str) -> Path:
    """A folder that looks like a finished expert-choice run (config, model config, tokenizer)."""
    folder.mkdir()
    overrides = common.scale_overrides(
        common.SCALES["tiny"], folder, tiny_corpus, folder / ".cache", scaling_factor=False
    ) | {"model.moe.router.kind": "expert_choice"}
    save_run_config(common.variant_config(overrides, {}), folder / "config.json")
    for name in ("model/config.json", "tokenizer/tokenizer.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    return folder


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"extra": {"top_k": 3}}, "unknown experiment options"),
        ({"extra": {"guard": 0}}, "guard must be an int from 1"),
        ({"extra": {"guard": 9}}, "guard must be an int from 1 to the base's 8 experts"),
        ({"extra": {"guard": True}}, "guard must be an int"),
        ({"jobs": 0}, "jobs must be an int"),
        ({"mcq": ("none.jsonl",)}, "none.jsonl"),
        ({"base_run": "missing"}, "not a run folder"),
        ({"base_run": "EC"}, "must be a token-choice MoE run"),
    ],
)
def test_bad_options_are_refused_before_the_output_folder(tiny: str, tmp_path: Path, options, message) -> None:
    if options.get("base_run") == "EC":
        options = {"base_run": str(_expert_choice_run(tmp_path / "ec", tiny))}
    elif "mcq" in options or "base_run" in options:
        options = {k: (tuple(str(tmp_path / v) for v in val) if k == "mcq" else str(tmp_path / val))
                   for k, val in options.items()}  # fmt: skip
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        experiment.run(ExperimentArgs(out=out, scale_name="tiny", corpus=tiny, **options))
    assert not out.exists()  # nothing written on bad input


def test_planned_steps_laptop_base_and_short_fine_tunes(tmp_path: Path) -> None:
    """The laptop base trains 1200 steps (its routed experts must matter); three fine-tunes of 300."""
    args = ExperimentArgs(out=tmp_path / "out", scale_name="laptop")
    assert experiment.planned_steps(args) == {"base": 1200, "fine-tunes": 3 * 300}
    assert experiment.planned_steps(dataclasses.replace(args, steps=100)) == {"base": 100, "fine-tunes": 3 * 25}
    assert not (tmp_path / "out").exists()


def test_per_prompt_unique_experts_are_the_samplers_statistic_row_by_row() -> None:
    """Batched generation split per prompt equals generating each prompt alone (rows never interact)."""
    torch.manual_seed(0)
    router = RouterConfig(kind="token_choice", num_experts=8, num_experts_per_tok=2, score="sigmoid", expert_bias=True)
    moe = MoEConfig(router=router, expert_hidden=8, num_shared_experts=0)
    config = ModelConfig(vocab_size=40, dim=16, num_layers=2, num_heads=2, max_seq_len=32, dense_hidden=16, moe=moe)
    model = DiffusionTransformer(dataclasses.replace(config, mask_id=39)).eval()
    prompts = torch.randint(0, 39, (3, 8))
    block = BlockRoutingConfig(block_size=8, top_p=0.4, guard=2)
    sampler = SamplerConfig(gen_length=16, block_length=8, steps=16, block_routing=block)
    tokens, per_prompt, stats = experiment.generate_per_prompt(model, prompts, sampler)
    assert stats.unique_experts == pytest.approx(sum(per_prompt) / 3)
    for i in range(3):
        alone = generate(model, prompts[i : i + 1], sampler)
        assert torch.equal(alone.generated[0], tokens[i])
        assert alone.stats.unique_experts == pytest.approx(per_prompt[i], rel=1e-12)


def test_block_routing_context_manager_restores_each_router() -> None:
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
