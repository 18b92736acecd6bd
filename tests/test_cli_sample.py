"""`dlmoe sample` end to end on a tiny trained run: every sampler option, a batch file, clear errors."""

import dataclasses
import json
from pathlib import Path

import pytest

from dlmoe.cli import main
from dlmoe.cli_sample import parse_options
from dlmoe.config_io import load_run_config
from dlmoe.train import Trainer
from tests.train.test_trainer import overrides


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("sample")
    config = load_run_config(None, overrides(tmp, "tc", **{"train.steps": 2, "model.max_seq_len": 64}))
    return Trainer(config, progress=False).fit().run_dir


def sample(capsys: pytest.CaptureFixture[str], run_dir: Path, *args: str) -> tuple[int, list[dict], str]:
    code = main(["sample", "--run", str(run_dir), "--no-progress", *args])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--cache", "dual", "--threshold", "0.5"],
        ["--cache", "prefix", "--cfg", "0.5", "--temperature", "0.7"],
        ["--block-routing", "top_p=0.5,guard=2", "--cache", "dual", "--stop-at-eos"],
        ["--suppress-tokens", "eos", "--suppress-commit-tokens", "5, 6"],
    ],
)
def test_sample_prints_texts_and_stats(capsys, run_dir, args) -> None:
    code, lines, err = sample(capsys, run_dir, "--prompt", "The king", "--num-samples", "2", *args)
    assert code == 0, err
    texts, stats = lines[:-1], lines[-1]["stats"]
    assert len(texts) == 2 and all(t["text"].startswith("The king") for t in texts)
    assert stats["generated_tokens"] == 2 * 16 and stats["num_forwards"] >= 1
    assert 1 <= stats["unique_experts"] <= 4 and stats["active_flops_per_token"] > 0


@pytest.mark.parametrize("extra", [[], ["--block-routing", "top_p=0.5,guard=2", "--cache", "dual"]])
def test_expert_memory_gives_the_same_text_and_reports_the_store(capsys, run_dir, extra) -> None:
    base = ["--prompt", "The king", "--num-samples", "2", *extra]
    code, resident, err = sample(capsys, run_dir, *base)
    assert code == 0, err
    code, offloaded, err = sample(capsys, run_dir, *base, "--expert-memory", "64KiB")
    assert code == 0, err
    assert offloaded[:-1] == resident[:-1]  # bit-identical generations
    stats = offloaded[-1]["stats"]
    assert stats["expert_bytes_read"] > 0 and stats["peak_expert_bytes"] <= 64 * 1024
    assert resident[-1]["stats"]["expert_bytes_read"] is None


def test_batch_file_runs_one_row_per_prompt(capsys, run_dir, tmp_path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The king\nThe queen answers with roses\nScene\n")
    code, lines, err = sample(capsys, run_dir, "--batch-file", str(prompts), "--cache", "dual")
    assert code == 0, err
    assert [line["prompt"] for line in lines[:-1]] == ["The king", "The queen answers with roses", "Scene"]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--threshold", "0"], "--threshold must be in (0.0, 1.0], got 0.0"),
        (["--threshold", "1.5"], "--threshold must be in (0.0, 1.0], got 1.5"),
        (["--cfg", "-1"], "--cfg must be"),
        (["--block-routing", "top_p=1.2,guard=2"], "block.top_p"),
        (["--block-routing", "top_p=0.5,guard=99"], "guard=99 must be <= num_experts=4"),
        (["--block-routing", "p=0.5"], "unknown key 'p'"),
        (["--block-routing", "top_p=high"], "top_p must be a float"),
        (["--capacity", "schedule=linear,k_min=1,k_max=2"], "needs an expert-choice model"),
        (["--capacity", "schedule=linear"], "needs schedule, k_min and k_max"),
        (["--cache", "exact"], "cache='exact' needs a block-causal model"),
        (["--gen-length", "30"], "must be a multiple of block_length=8"),
        (["--gen-length", "16", "--steps", "3"], "steps=3 must be a multiple of the number of blocks"),
        (["--gen-length", "64"], "exceeds the model's max_seq_len=64"),
        (["--prompt", "<|mask|>"], "must not contain mask_id"),
        (["--suppress-tokens", "eos,x"], "--suppress-tokens takes token ids (ints, or 'eos') separated by commas"),
        (["--suppress-commit-tokens", "1,,2"], "--suppress-commit-tokens takes token ids"),
        (["--suppress-tokens", "99999"], "suppress_tokens[0] must be <="),
        (["--suppress-tokens", "0"], "suppress_tokens must not hold mask_id=0"),
        (["--suppress-tokens", "eos", "--suppress-commit-tokens", "EOS"], "are in both"),
        (["--expert-memory", "lots"], "expert memory 'lots' is not a size"),
        (["--expert-memory", "1"], "smaller than one expert"),
    ],
)
def test_bad_input_is_one_clear_error(capsys, run_dir, args, match) -> None:
    code, lines, err = sample(capsys, run_dir, *args)
    assert code == 2 and lines == [] and match in err, err


def test_bad_batch_files(capsys, run_dir, tmp_path) -> None:
    blank = tmp_path / "blank.txt"
    blank.write_text("one\n\ntwo\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    for path, match in [(blank, "blank lines at [2]"), (empty, "is empty"), (tmp_path / "nope.txt", "does not exist")]:
        code, lines, err = sample(capsys, run_dir, "--batch-file", str(path))
        assert code == 2 and lines == [] and match in err, err


def test_parse_options() -> None:
    assert parse_options("top_p=0.5, guard=3", "--x", {"top_p": float, "guard": int}) == {"top_p": 0.5, "guard": 3}
    with pytest.raises(ValueError, match="key=value pairs"):
        parse_options("top_p", "--x", {"top_p": float})


def test_suppress_options_reach_sample_text_with_eos_resolved(capsys, run_dir, monkeypatch) -> None:
    import dlmoe.inference

    eos = dlmoe.inference.read_run_config(run_dir).model.eos_id
    assert isinstance(eos, int)
    seen = {}

    def fake_sample_text(run, sampler, **kwargs):  # the options arrive in the one sampler config
        seen.update(suppress_tokens=sampler.suppress_tokens, suppress_commit_tokens=sampler.suppress_commit_tokens)
        raise ValueError("stop here")

    monkeypatch.setattr(dlmoe.inference, "sample_text", fake_sample_text)
    code, _, err = sample(capsys, run_dir, "--suppress-tokens", "eos, 7", "--suppress-commit-tokens", "3")
    assert code == 2 and "stop here" in err
    assert seen["suppress_tokens"] == [eos, 7] and seen["suppress_commit_tokens"] == [3]
    code, _, err = sample(capsys, run_dir)
    assert seen["suppress_tokens"] is None and seen["suppress_commit_tokens"] is None


def test_suppressed_eos_is_never_generated(capsys, run_dir) -> None:
    code, lines, err = sample(
        capsys, run_dir, "--prompt", "The king", "--temperature", "1.0", "--suppress-tokens", "eos"
    )
    assert code == 0, err
    assert all("<|endoftext|>" not in line["text"] for line in lines[:-1])


def test_sample_text_config_form_equals_keyword_form(run_dir) -> None:
    from dlmoe.inference import read_run_config, sample_text
    from dlmoe.sampling import SamplerConfig

    section = read_run_config(run_dir).sample
    options = dict(threshold=0.5, cache="dual", stop_at_eos=True)
    old = sample_text(run_dir, prompts=["The king"], seed=3, **options)  # threshold=: adaptive steps, as before
    new = sample_text(run_dir, dataclasses.replace(section, steps=None, **options), prompts=["The king"], seed=3)
    assert old.texts == new.texts and old.stats.num_forwards == new.stats.num_forwards
    for legacy in (  # the old forms: a section with keywords, and the old parameter name
        sample_text(run_dir, section, prompts=["The king"], seed=3, **options),
        sample_text(run_dir, sample=section, prompts=["The king"], seed=3, **options),
    ):
        assert legacy.texts == old.texts
    # a plain SamplerConfig: prompt and samples per prompt come from the run's section
    plain = sample_text(run_dir, SamplerConfig(gen_length=8, block_length=8, steps=8))
    assert len(plain.texts) == section.num_samples and all(t.startswith(section.prompt) for t in plain.texts)
