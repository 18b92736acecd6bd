"""Every user error is one clear line: `dlmoe: error: <what, where, what to do>`, never a traceback.

Bad config files, damaged saved configs, pickled weights, tampered checkpoints, a full disk, overrides
after options, NaN in the JSON summary, and whatever else escapes a command."""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from dlmoe import cli
from dlmoe.checkpoint import STATE_FILE, latest_checkpoint
from dlmoe.cli import main
from dlmoe.config_io import load_run_config, read_json, save_run_config
from dlmoe.train.trainer import TrainSummary
from tests.train.test_checkpoint_safety import PAYLOADS, RunsCode, payloads, replace_file
from tests.train.test_trainer import overrides

ALLOWED = "a YAML mapping of sections: run_dir, model, data, train, sample, parallel"
TINY = {
    "model.dim": 32,
    "model.num_layers": 1,
    "model.num_heads": 2,
    "model.moe.expert_hidden": 16,
    "model.moe.router.num_experts": 4,
    "data.seq_len": 32,
    "model.max_seq_len": 32,
    "train.batch_size": 2,
    "train.steps": 2,
    "train.eval_every": 2,
    "train.eval_batches": 1,
    "train.checkpoint_every": 1,
}


def tiny(tmp_path: Path, run: str, **extra: object) -> list[str]:
    """Overrides of a 2-step run of a tiny model on a small corpus under `tmp_path` (see test_trainer)."""
    return overrides(tmp_path, run, **(TINY | extra))


def error_of(capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line a failed command printed last on stderr (after any progress notes), no traceback."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    errors = [line for line in lines if line.startswith("dlmoe: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, lines
    return errors[0]


# --------------------------------------------------------------------------------------------------
# config files


BAD_CONFIGS = {
    "syntax.yaml": ("model:\n  dim: 32\n train: [1,\n", r"YAML syntax error at line 3, column 2"),
    "list.yaml": ("- model\n- train\n", "its top level is a list"),
    "scalar.yaml": ("just words\n", "its top level is a single value"),
    "tag.yaml": ("run_dir: !!python/object/apply:os.system ['touch {marker}']\n", "!!python/object/apply:os.system"),
    "bad.json": ('{"train": {"steps": 3,}}', r"is not valid JSON \(Expecting property name .* at line 1, column 23\)"),
    "empty.yaml": ("", "is empty"),
    "comments.yaml": ("# nothing here yet\n\n", "is empty"),
    "empty.json": ("", "is empty"),
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_a_bad_config_file_is_one_line_naming_it(tmp_path: Path, capsys, name: str) -> None:
    marker = tmp_path / "marker"
    text, expected = BAD_CONFIGS[name]
    path = tmp_path / name
    path.write_text(text.replace("{marker}", str(marker)))
    guard = [f"run_dir={tmp_path / 'runs'}", f"data.corpus={tmp_path / 'no-corpus'}"]  # never a real run
    assert main(["train", "--config", str(path), "--no-progress", *guard]) == 2
    line = error_of(capsys)
    assert str(path) in line and re.search(expected, line), line
    assert ALLOWED in line
    with pytest.raises(ValueError, match=expected):
        load_run_config(path)
    assert not marker.exists()  # a python tag is refused, never executed
    assert not (tmp_path / "runs").exists()


def test_the_config_files_of_the_repository_still_load() -> None:
    for path in sorted(Path(__file__).parents[1].glob("configs/*.yaml")):
        load_run_config(path)


# --------------------------------------------------------------------------------------------------
# a run's saved config.json


def fake_run(folder: Path, config_text: str | None = None) -> Path:
    """A folder shaped like a finished run (config, model/config.json, tokenizer) without real weights."""
    (folder / "model").mkdir(parents=True)
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "tokenizer.json").write_text("{}")
    (folder / "model" / "config.json").write_text("{}")
    if config_text is None:
        save_run_config(load_run_config(None, [f"run_dir={folder}"]), folder / "config.json")
    else:
        (folder / "config.json").write_text(config_text)
    return folder


@pytest.mark.parametrize(("text", "why"), [("", "the file is empty"), ('{"model": ', "Expecting value at line 1")])
def test_a_damaged_saved_config_names_the_file(tmp_path: Path, capsys, text: str, why: str) -> None:
    run = fake_run(tmp_path / "run", text)
    damaged = f"{run / 'config.json'} is not valid JSON ({why}"
    assert main(["eval-ppl", "--run", str(run)]) == 2
    line = error_of(capsys)
    assert damaged in line and "the run's config is damaged" in line
    assert main(["finetune", "--from", str(run), f"run_dir={tmp_path / 'ft'}", "--no-progress"]) == 2
    line = error_of(capsys)
    assert damaged in line and "--from=" in line
    assert not (tmp_path / "ft").exists()


def test_read_json_says_where_and_what(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    path.write_text('{"a": 1}\n[')
    with pytest.raises(ValueError, match=r"x\.json is not valid JSON \(Extra data at line 2, column 1\); it is a test"):
        read_json(path, "it is a test")
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"does not hold a JSON object \(it holds a list\)"):
        read_json(path, "it is a test")
    assert read_json(path, "it is a test", mapping=False) == [1, 2]
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match="not UTF-8 text at byte 0"):
        read_json(path, "it is a test")


# --------------------------------------------------------------------------------------------------
# pickled weights


def test_a_run_holding_pytorch_model_bin_is_refused_unopened(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "marker"
    run = fake_run(tmp_path / "run")
    (run / "model" / "pytorch_model.bin").write_bytes(pickle.dumps(RunsCode(marker)))
    refused = "holds pytorch_model.bin (a pickle); dlmoe reads only safetensors"
    for argv in (
        ["eval-ppl", "--run", str(run)],
        ["sample", "--run", str(run), "--no-progress"],
        ["convert", str(run), "--export", "llada2_moe", "--out", str(tmp_path / "out")],
    ):
        assert main(argv) == 2, argv
        assert refused in error_of(capsys)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_convert_refuses_a_checkpoint_of_pickles(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "marker"
    checkpoint = tmp_path / "hf"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"architectures": ["LLaDA2MoeModelLM"]}))
    (checkpoint / "pytorch_model.bin").write_bytes(pickle.dumps(RunsCode(marker)))
    assert main(["convert", str(checkpoint), "--out", str(tmp_path / "run")]) == 2
    assert "holds pytorch_model.bin (a pickle); dlmoe reads only safetensors" in error_of(capsys)
    assert not marker.exists() and not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------------
# a real (tiny) run: overrides anywhere on the line, tampered checkpoints on --resume


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A finished 2-step run, trained through the CLI with overrides before AND after options."""
    tmp = tmp_path_factory.mktemp("cli_errors")
    config = tmp / "small.yaml"
    config.write_text("train:\n  log_every: 1\n")
    first, *rest = tiny(tmp, "run")
    argv = ["train", "--config", str(config), first, "--no-progress", *rest]
    code = main(argv)
    assert code == 0
    return tmp / "run", rest


def test_overrides_after_options_are_accepted(trained, capsys) -> None:
    run, _ = trained
    assert latest_checkpoint(run).name == "step_00000002"  # train.steps=2 came after --no-progress
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["steps"] == 2 and saved["train"]["log_every"] == 1 and saved["model"]["dim"] == 32


def test_leftovers_that_are_not_overrides_are_still_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["train", "train.steps=2", "--no-progress", "--bogus", "train.lr=0.1"])
    assert caught.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["routing-demo", "experts=4"])  # a command without overrides
    assert "unrecognized arguments: experts=4" in capsys.readouterr().err


def _copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


@pytest.mark.parametrize("payload", PAYLOADS)
def test_resume_from_a_tampered_checkpoint_is_one_line(trained, tmp_path: Path, capsys, payload: str) -> None:
    marker = tmp_path / "marker"
    run = _copy_run(trained[0], tmp_path / "run")
    checkpoint = latest_checkpoint(run)
    replace_file(checkpoint, STATE_FILE, payloads(marker)[payload])
    assert main(["train", "--resume", f"run_dir={run}", "--no-progress", *trained[1]]) == 2
    line = error_of(capsys)
    assert f"checkpoint {checkpoint}: state.pt cannot be loaded safely (weights_only)" in line
    assert not marker.exists()


def test_resume_from_a_checkpoint_relabelled_sharded_is_one_line(trained, tmp_path: Path, capsys) -> None:
    """meta.json says "dcp": --resume goes through the sharded loader, whose .metadata DCP would unpickle."""
    marker = tmp_path / "marker"
    run = _copy_run(trained[0], tmp_path / "run")
    checkpoint = latest_checkpoint(run)
    (checkpoint / "dcp").mkdir()
    replace_file(checkpoint, "dcp/.metadata", pickle.dumps(RunsCode(marker)))
    meta = json.loads((checkpoint / "meta.json").read_text())
    (checkpoint / "meta.json").write_text(json.dumps(meta | {"layout": "dcp"}))
    assert main(["train", "--resume", f"run_dir={run}", "--no-progress", *trained[1]]) == 2
    assert f"checkpoint {checkpoint}: dcp/.metadata cannot be loaded safely" in error_of(capsys)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# a full disk


def test_disk_full_while_checkpointing_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    def full(tensors, filename, **kwargs):
        Path(filename).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert main(["train", "--no-progress", *tiny(tmp_path, "full")]) == 1
    line = error_of(capsys)
    step_dir = tmp_path / "full" / "checkpoints" / "step_00000001"
    assert line.startswith(f"dlmoe: error: disk full while writing {step_dir} ")
    assert line.endswith("; earlier checkpoints are intact (free space and rerun with --resume)")


TORCH_FULL_DISK = [
    "[enforce fail at inline_container.cc:664] . unexpected pos 4736 vs 4630",
    "PytorchStreamWriter failed writing file data/3: file write failed",
]


@pytest.mark.parametrize("message", TORCH_FULL_DISK)
def test_torch_save_on_a_full_disk_is_reported_as_disk_full(tmp_path: Path, monkeypatch, message: str) -> None:
    from dlmoe.checkpoint import save_checkpoint

    def full(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"disk full while writing .*step_00000001 .*earlier checkpoints are intact"):
        save_checkpoint(tmp_path, 1, torch.nn.Linear(2, 2), {})


def test_disk_full_elsewhere_names_the_file(capsys, monkeypatch) -> None:
    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.csv")

    monkeypatch.setattr(cli, "train", full)
    assert main(["train", "--no-progress"]) == 1
    assert error_of(capsys) == (
        "dlmoe: error: disk full while writing /runs/x/metrics.csv; earlier checkpoints are intact "
        "(free space and rerun with --resume)"
    )
    monkeypatch.setattr(cli, "routing_stats", full)
    assert main(["routing-stats", "--run", "x"]) == 1
    assert error_of(capsys) == "dlmoe: error: disk full while writing /runs/x/metrics.csv; free space and rerun"

    def wrapped(args):  # e.g. a collective failure raised from a checkpoint save that ran out of space
        saved = OSError(errno.ENOSPC, "disk full while writing /runs/x/checkpoints/step_00000004 (...); earlier")
        raise RuntimeError("rank 0 failed") from saved

    monkeypatch.setattr(cli, "train", wrapped)
    assert main(["train", "--no-progress"]) == 1
    assert error_of(capsys) == "dlmoe: error: disk full while writing /runs/x/checkpoints/step_00000004 (...); earlier"


# --------------------------------------------------------------------------------------------------
# anything else that escapes a command; the JSON summary


@pytest.mark.parametrize(
    ("raised", "code", "line"),
    [
        (ValueError("bad input"), 2, "dlmoe: error: bad input"),
        (RuntimeError("first\n  second\nthird"), 1, "dlmoe: error: first (set DLMOE_DEBUG=1 for the traceback)"),
        (KeyError("scheduler"), 1, "dlmoe: error: KeyError: 'scheduler' (set DLMOE_DEBUG=1 for the traceback)"),
        (AssertionError(), 1, "dlmoe: error: AssertionError (set DLMOE_DEBUG=1 for the traceback)"),
    ],
)
def test_any_error_is_one_line(capsys, monkeypatch, raised: Exception, code: int, line: str) -> None:
    def fail(args):
        raise raised

    monkeypatch.delenv("DLMOE_DEBUG", raising=False)
    monkeypatch.setattr(cli, "routing_stats", fail)
    assert main(["routing-stats", "--run", "x"]) == code
    assert error_of(capsys) == line
    monkeypatch.setenv("DLMOE_DEBUG", "1")
    with pytest.raises(type(raised)):
        main(["routing-stats", "--run", "x"])


def test_interrupt_exits_130(capsys, monkeypatch) -> None:
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.delenv("DLMOE_DEBUG", raising=False)
    monkeypatch.setattr(cli, "routing_stats", interrupted)
    assert main(["routing-stats", "--run", "x"]) == 130
    assert capsys.readouterr().err == "dlmoe: interrupted\n"


def test_summary_json_never_holds_nan(capsys) -> None:
    summary = TrainSummary(Path("runs/x"), 2, math.nan, math.inf, -math.inf, 12.34567, 0.5)
    cli._print_summary(summary)

    def refuse(constant: str) -> None:
        raise AssertionError(f"invalid JSON constant {constant}")

    printed = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert printed == {
        "run_dir": "runs/x",
        "steps": 2,
        "final_loss": None,
        "val_loss": None,
        "val_bits_per_byte": None,
        "tokens_per_s": 12.3457,
        "wall_s": 0.5,
    }


def test_the_real_process_prints_one_line_and_no_traceback(tmp_path: Path) -> None:
    config = tmp_path / "broken.yaml"
    config.write_text("train:\n  steps: [1,\n")
    dlmoe = Path(sys.executable).parent / "dlmoe"
    env = {k: v for k, v in os.environ.items() if k != "DLMOE_DEBUG"}
    done = subprocess.run(
        [str(dlmoe), "train", "--config", str(config), "--no-progress", "train.steps=2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()] and "Traceback" not in done.stderr
    assert done.stderr.startswith(f"dlmoe: error: config file {config}: YAML syntax error at line 3")
