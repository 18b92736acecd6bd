"""`dlmoe retrofit` at a tiny scale: output contract, router weights kept or re-initialised, EC base refused, CLI."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from dlmoe.cli import main
from dlmoe.config_io import run_config_from_dict
from dlmoe.experiments import SCALES, ExperimentArgs
from dlmoe.experiments._fine_tune import probe_overrides
from dlmoe.experiments.retrofit import TC_ONLY, router_weights, run, start_arm, steps_to_reach
from dlmoe.model.hf import DlmoeConfig, DlmoeForDiffusionLM
from dlmoe.train.init_from import SourceRun
from tests.experiments.conftest import TINY

SCALE = dataclasses.replace(TINY, steps=2, eval_batches=1)
ARM_KEYS = {
    "seed",
    "run_dir",
    "val_at_start",
    "val_final",
    "curve",
    "tokens_per_s",
    "step_s",
    "train_s",
    "router_weights_equal_source",
    "load_max_over_mean",
    "dropped_fraction",
    "zero_expert_fraction",
    "experts_per_token",
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> tuple[Path, dict]:
    """A token-choice base trained inside --out, then both arms for 1 step, 1 seed."""
    out = tmp_path_factory.mktemp("rf") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SCALES, "tiny", SCALE)
        return out, run(ExperimentArgs(out=out, scale_name="tiny", corpus=str(corpus), seeds=1, steps=1))


def source_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return DlmoeForDiffusionLM.from_pretrained(run_dir / "model").state_dict()


def test_output_contract(finished: tuple[Path, dict]) -> None:
    out, results = finished
    assert json.loads((out / "experiment.json").read_text())["experiment"] == "retrofit"
    saved = json.loads((out / "results.json").read_text())
    assert saved == results and set(saved) == {"experiment", "settings", "arms", "summary", "controls"}
    assert set(saved["arms"]) == {"tc", "ec"} and all(set(a[0]) == ARM_KEYS for a in saved["arms"].values())
    summary = saved["summary"]
    expected = {"val_before_swap", "val_after_swap", "swap_cost", "ec_minus_tc_final", "throughput_ratio_ec_over_tc"}
    assert expected <= set(summary)
    tc, ec = saved["arms"]["tc"][0], saved["arms"]["ec"][0]
    assert [point[0] for point in ec["curve"]] == [0.0, 1.0]  # before the first step, then after it
    assert ec["curve"][0][2] == ec["val_at_start"] and tc["val_at_start"] == summary["val_before_swap"]["mean"]
    assert ec["load_max_over_mean"] == pytest.approx(1.0)  # expert choice: balanced by construction
    assert summary["router_weights_kept"] and ec["router_weights_equal_source"]
    for name in ("validation.png", "throughput_balance.png"):
        assert (out / name).stat().st_size > 1000
    assert (out / "results.md").read_text().startswith("## retrofit")
    assert (out / ec["run_dir"] / "model" / "model.safetensors").is_file()  # the retrofitted model is kept
    assert (out / tc["run_dir"] / "model").is_dir() and not list((out / "runs").glob("*/checkpoints"))


def test_routed_experts_control_and_verdicts_are_reported(finished: tuple[Path, dict]) -> None:
    out, results = finished
    controls = results["controls"]
    assert set(controls) == {"source", "tc", "ec"} and [r["seed"] for r in controls["ec"]] == [0]
    for record in (controls["source"][0], controls["tc"][0], controls["ec"][0]):
        assert record["routed_contribution"] == pytest.approx(record["val_elbo_routed_off"] - record["val_elbo"])
    # the TC arm's control is measured on the model it finished with: its ELBO is the arm's final validation
    assert controls["tc"][0]["val_elbo"] == pytest.approx(results["arms"]["tc"][0]["val_final"], rel=1e-5)
    text = (out / "results.md").read_text()
    assert "Routed-experts-off control" in text and "Ran on " in text
    assert text.count("**inconclusive** — a pretrained TC DLM can be retrofitted") == 2  # one seed: no interval


def test_only_the_router_kind_changes(finished: tuple[Path, dict]) -> None:
    out, results = finished
    base = json.loads((out / "base" / "config.json").read_text())
    tc = json.loads((out / results["arms"]["tc"][0]["run_dir"] / "config.json").read_text())
    ec = json.loads((out / results["arms"]["ec"][0]["run_dir"] / "config.json").read_text())
    assert tc["model"] == base["model"]  # the control continues token choice unchanged
    router = ec["model"]["moe"].pop("router")
    assert router["kind"] == "expert_choice" and not {"aux_loss_coef", "expert_bias"} & set(router)  # no TC fields
    assert router["num_experts_per_tok"] == base["model"]["moe"]["router"]["num_experts_per_tok"]  # same k
    base["model"]["moe"].pop("router")
    assert ec["model"] == base["model"]
    assert ec["train"] == tc["train"] and ec["data"] == tc["data"]  # same batches, noise, LR, steps


def test_router_weights_kept_bit_exactly_or_reinitialised(finished: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = finished
    source, reference = SourceRun.open(out / "base"), source_weights(out / "base")
    overrides = probe_overrides(SCALE, 1, 1e-4, eval_every=1)
    kept = start_arm(source, tmp_path / "kept", "ec", 0, overrides, reinit_router=False).model.state_dict()
    fresh = start_arm(source, tmp_path / "fresh", "ec", 0, overrides, reinit_router=True).model.state_dict()
    routers = router_weights(DlmoeForDiffusionLM.from_pretrained(out / "base" / "model"))
    assert routers and kept.keys() == reference.keys() == fresh.keys()
    assert all(torch.equal(kept[k], reference[k]) for k in reference)
    assert all(not torch.equal(fresh[k], reference[k]) for k in routers)
    assert all(fresh[k].std() == pytest.approx(0.02, rel=0.5) for k in routers)
    assert all(torch.equal(fresh[k], reference[k]) for k in reference if k not in routers)  # only the router


def test_expert_bias_is_dropped_by_the_swap(finished: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = finished
    biased = tmp_path / "biased"
    shutil.copytree(out / "base", biased, ignore=shutil.ignore_patterns("model"))
    config = json.loads((biased / "config.json").read_text())
    config["model"]["moe"]["router"]["expert_bias"] = True
    (biased / "config.json").write_text(json.dumps(config))
    model = DlmoeForDiffusionLM(DlmoeConfig.from_model_config(run_config_from_dict(config).model))
    model.load_state_dict(source_weights(out / "base"), strict=False)
    model.save_pretrained(biased / "model")
    assert any(k.endswith("expert_bias") for k in model.state_dict())
    overrides = probe_overrides(SCALE, 1, 1e-4, eval_every=1)
    ec = start_arm(SourceRun.open(biased), tmp_path / "ec", "ec", 0, overrides, reinit_router=False)
    assert ec.config.model.moe.router.expert_bias is False
    assert not any(k.endswith("expert_bias") for k in ec.model.state_dict())
    for name in TC_ONLY:  # TC-only knobs at their neutral defaults, as RouterConfig validates for EC
        assert getattr(ec.config.model.moe.router, name) == getattr(type(ec.config.model.moe.router)(), name)


def test_expert_choice_base_is_refused(finished: tuple[Path, dict], tmp_path: Path, capsys) -> None:
    out, _ = finished
    ec_run = tmp_path / "ec_run"
    shutil.copytree(out / "base", ec_run)
    config = json.loads((ec_run / "config.json").read_text())
    config["model"]["moe"]["router"] |= {"kind": "expert_choice", "aux_loss_coef": 0.0}
    (ec_run / "config.json").write_text(json.dumps(config))
    args = ExperimentArgs(out=tmp_path / "refused", scale_name="tiny", base_run=str(ec_run))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SCALES, "tiny", SCALE)
        with pytest.raises(ValueError, match="already routes with model.moe.router.kind='expert_choice'"):
            run(args)
        assert main(["retrofit", "--from", str(ec_run), "--out", str(tmp_path / "refused"), "--scale", "tiny"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dlmoe: error: --from=") and err.count("\n") == 1
    assert not (tmp_path / "refused").exists()


def test_cli_reinit_router(finished: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SCALES, "tiny", SCALE)
    base, target = finished[0] / "base", tmp_path / "cli"
    argv = ["retrofit", "--from", str(base), "--out", str(target), "--scale", "tiny", "--steps", "1", "--seeds", "1"]
    assert main([*argv, "--reinit-router"]) == 0
    results = json.loads((target / "results.json").read_text())
    assert results["settings"]["reinit_router"] and not results["summary"]["router_weights_kept"]
    assert results["arms"]["tc"][0]["val_at_start"] == pytest.approx(finished[1]["arms"]["tc"][0]["val_at_start"])
    assert not (target / "base").exists()


def test_steps_to_reach() -> None:
    curve = [[0.0, 0.0, 5.0], [10.0, 2.0, 4.5], [20.0, 4.0, 4.0]]
    assert steps_to_reach(curve, 4.5) == (10.0, 2.0)
    assert all(x != x for x in steps_to_reach(curve, 3.0))  # never: NaN
