"""A run survives a kill at the worst instant, a second trainer, and settings that would corrupt it.

Kills are real: `DLMOE_KILL_AT=<name>` makes the process SIGKILL itself right after the new
content of `<name>` is written and before it is renamed into place (`dlmoe._fs`), the instant a
non-atomic writer would have left a truncated file.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dlmoe.config_io import load_run_config
from dlmoe.inference import load_run, read_run_config
from dlmoe.train import Trainer
from dlmoe.train.metrics import read_metrics
from tests.train.test_trainer import losses, overrides

ENV = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def dlmoe(*args: object, kill_at: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = ENV | ({"DLMOE_KILL_AT": kill_at} if kill_at else {})
    cmd = [sys.executable, "-m", "dlmoe", *map(str, args)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if kill_at:
        assert result.returncode == -signal.SIGKILL, f"not killed at {kill_at}: {result.stderr[-2000:]}"
    elif check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- B: writes a kill cannot break -------------------------------------------------------------------


@pytest.mark.slow
def test_a_kill_while_the_tokenizer_is_saved_leaves_none_and_the_rerun_trains(tmp_path: Path) -> None:
    args = ["train", "--no-progress", *overrides(tmp_path, "run", **{"train.steps": 2})]
    dlmoe(*args, kill_at="tokenizer")
    assert not (tmp_path / "run" / "tokenizer").exists()  # no 0-byte tokenizer.json to trip over
    dlmoe(*args)  # the scratch folder is cleared, the tokenizer trained again
    assert [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(".tokenizer")] == []
    assert json.loads((tmp_path / "run" / "model" / "tokenizer.json").read_text())


@pytest.mark.slow
def test_kills_while_resume_rewrites_config_and_metrics_lose_nothing(tmp_path: Path) -> None:
    args = ["train", "--no-progress", *overrides(tmp_path, "run")]
    dlmoe(*args)
    run = tmp_path / "run"
    expected = losses(run)
    config_before = (run / "config.json").read_text()
    # the run died after its step-4 checkpoint: a resume rewrites config.json and truncates metrics.csv
    shutil.rmtree(run / "checkpoints" / "step_00000006")
    dlmoe(*args, "--resume", kill_at="config.json")
    assert (run / "config.json").read_text() == config_before
    dlmoe(*args, "--resume", kill_at="metrics.csv")
    assert losses(run) == expected  # all rows still there (the truncation never half-happened)
    dlmoe(*args, "--resume")
    assert losses(run) == expected  # and the finished resume equals the uninterrupted run


@pytest.mark.slow
def test_a_kill_while_the_model_folder_is_replaced_keeps_the_previous_model(tmp_path: Path) -> None:
    args = ["train", "--no-progress", *overrides(tmp_path, "run", **{"train.steps": 2})]
    dlmoe(*args)
    run = tmp_path / "run"
    before = digest(run / "model" / "model.safetensors")
    dlmoe(*args, "--resume", "train.steps=4", kill_at="model")
    assert digest(run / "model" / "model.safetensors") == before
    load_run(run)  # still loads
    dlmoe(*args, "--resume", "train.steps=4")
    assert digest(run / "model" / "model.safetensors") != before


def test_metrics_reader_skips_a_row_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("step,loss\n1,2.5\n2,2.4\n5")  # killed while appending step 55's row
    assert [r["step"] for r in read_metrics(path)] == ["1", "2"]


# -- C: runs a second command cannot destroy ------------------------------------------------------------


@pytest.mark.slow
def test_a_second_trainer_on_the_same_folder_is_refused_naming_the_first(tmp_path: Path) -> None:
    args = ["train", "--no-progress", *overrides(tmp_path, "run", **{"train.steps": 2000, "train.checkpoint_every": 5})]
    first = subprocess.Popen([sys.executable, "-m", "dlmoe", *args], env=ENV, stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / "run" / ".lock"
        deadline = time.time() + 120
        while time.time() < deadline and not (tmp_path / "run" / "checkpoints" / "step_00000005").exists():
            time.sleep(0.1)
        assert json.loads(lock.read_text())["pid"] == first.pid
        second = dlmoe(*args, "--resume", check=False)
        assert second.returncode == 2
        assert f"in use by another dlmoe process (pid {first.pid}" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # kill -9 released the lock (no stale lock file to delete by hand): the run can be resumed
    config = load_run_config(None, overrides(tmp_path, "run", **{"train.steps": 2000, "train.checkpoint_every": 5}))
    Trainer(config, resume=True, progress=False).close()


def test_a_finished_run_is_refused_without_resume_and_overwrite_clears_only_the_run(tmp_path: Path) -> None:
    args = overrides(tmp_path, "run", **{"train.steps": 2})
    Trainer(load_run_config(None, args), progress=False).fit()
    run = tmp_path / "run"
    (run / "notes.txt").write_text("mine")
    before = digest(run / "metrics.csv")
    with pytest.raises(ValueError, match="already holds a run; pass --resume .* --overwrite"):
        Trainer(load_run_config(None, args), progress=False)
    assert digest(run / "metrics.csv") == before
    with pytest.raises(ValueError, match="pass one of them"):
        Trainer(load_run_config(None, args), resume=True, overwrite=True)
    Trainer(load_run_config(None, args + ["train.steps=1"]), overwrite=True, progress=False).fit()
    assert [r["step"] for r in read_metrics(run / "metrics.csv")] == ["1"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]
    assert (run / "notes.txt").read_text() == "mine"


def test_finetune_from_a_copied_run_never_writes_into_the_original(tmp_path: Path) -> None:
    from dlmoe.cli import main

    Trainer(load_run_config(None, overrides(tmp_path, "orig", **{"train.steps": 2})), progress=False).fit()
    shutil.copytree(tmp_path / "orig", tmp_path / "copy")
    before = {p.name: digest(p) for p in (tmp_path / "orig").rglob("*") if p.is_file()}
    assert main(["finetune", "--from", str(tmp_path / "copy"), "--no-progress", "train.steps=1"]) == 0
    assert {p.name: digest(p) for p in (tmp_path / "orig").rglob("*") if p.is_file()} == before
    assert (tmp_path / "copy-ft" / "model" / "model.safetensors").is_file()
    assert read_run_config(tmp_path / "copy").run_dir == str(tmp_path / "copy")  # not the original's


def test_a_refused_resume_changes_nothing_and_an_accepted_one_applies_its_overrides(tmp_path: Path) -> None:
    args = overrides(tmp_path, "run", **{"train.steps": 4})
    Trainer(load_run_config(None, args), progress=False).fit()
    run = tmp_path / "run"
    snapshot = {p: digest(p) for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    for bad, match in (
        ("model.dim=64", r"cannot change model\.dim \(run: 32, asked: 64\)"),
        ("train.seed=3", r"cannot change train\.seed"),
        ("train.steps=3", r"cannot shrink train\.steps from 4 to 3"),
    ):
        with pytest.raises(ValueError, match=match):
            Trainer(load_run_config(None, [*args, bad]), resume=True, progress=False)
    assert {p: digest(p) for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == snapshot
    trainer = Trainer(load_run_config(None, [*args, "train.lr=1e-5", "train.steps=8"]), resume=True, progress=False)
    lr = trainer.optimizer.param_groups[0]["lr"]
    assert trainer.scheduler.base_lrs == [1e-5, 1e-5] and 0 < lr <= 1e-5
    trainer.fit()
    assert int(read_metrics(run / "metrics.csv")[-1]["step"]) == 8
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == 1e-5


def test_resume_with_unchanged_settings_trains_with_the_saved_lr_exactly(tmp_path: Path) -> None:
    args = overrides(tmp_path, "run", **{"train.steps": 4})
    trainer = Trainer(load_run_config(None, args), progress=False)
    trainer.fit()
    lrs = [g["lr"] for g in trainer.optimizer.param_groups]
    resumed = Trainer(load_run_config(None, args), resume=True, progress=False)
    assert [g["lr"] for g in resumed.optimizer.param_groups] == lrs
    resumed.close()


def test_a_rejected_corpus_leaves_nothing_and_a_tokenizer_is_kept_to_its_corpus(tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(bytes(range(256)) * 64)  # one "document"
    args = overrides(tmp_path, "run", **{"data.corpus": blob})
    with pytest.raises(ValueError, match="fewer than 2 non-empty documents"):
        Trainer(load_run_config(None, args), progress=False)
    assert not (tmp_path / "run").exists()
    # a tokenizer left in a folder (a run that died before its config) serves only its own corpus
    Trainer(load_run_config(None, overrides(tmp_path, "run", **{"train.steps": 1})), progress=False).fit()
    for name in ("config.json", "metrics.csv", "checkpoints", "model", "run.json"):
        path = tmp_path / "run" / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    other = tmp_path / "other"
    other.mkdir()
    for i in range(3):
        (other / f"d{i}.txt").write_text("another corpus entirely. " * 200)
    with pytest.raises(ValueError, match="was trained on corpus"):
        Trainer(load_run_config(None, overrides(tmp_path, "run", **{"data.corpus": other})), progress=False)


def test_run_records_the_resolved_precision(tmp_path: Path) -> None:
    args = overrides(tmp_path, "run", **{"train.steps": 1})
    trainer = Trainer(load_run_config(None, args), progress=False)
    trainer.fit()
    launch = json.loads((tmp_path / "run" / "run.json").read_text())["launches"][-1]
    assert launch["precision"]["requested"] == "auto"
    assert launch["precision"]["dtype"] == trainer.precision.name
    assert trainer.precision.dtype in (torch.float32, torch.bfloat16)


def test_a_damaged_tokenizer_is_named_with_what_to_do(tmp_path: Path) -> None:
    from dlmoe.data import load_tokenizer

    Trainer(load_run_config(None, overrides(tmp_path, "run", **{"train.steps": 1})), progress=False).fit()
    (tmp_path / "run" / "tokenizer" / "tokenizer.json").write_text("")  # what a non-atomic writer left
    with pytest.raises(ValueError, match=r"tokenizer '.*run/tokenizer' cannot be read .*--overwrite"):
        load_tokenizer(tmp_path / "run" / "tokenizer")
