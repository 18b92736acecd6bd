"""Training end to end on a tiny corpus: losses fall, resume is exact (also after a real kill), bad input is clear."""

import csv
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
from dlmoe.inference import eval_ppl, routing_by_mask_ratio, sample_text
from dlmoe.train import Trainer, TrainingError

TEXT = "\n\n".join(
    f"Scene {i}. The king speaks of stars and seas; the queen answers with {i % 7} roses and a song."
    for i in range(400)
)


def overrides(tmp_path: Path, run: str, **extra: object) -> list[str]:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i, chunk in enumerate(TEXT.split("\n\n")[::50]):
        (corpus / f"doc{i}.txt").write_text(TEXT[i * 2000 : (i + 1) * 2000] + chunk)
    base = {
        "run_dir": tmp_path / run,
        "data.corpus": corpus,
        "data.vocab_size": 300,
        "data.seq_len": 32,
        "data.validation_fraction": 0.2,
        "data.cache_dir": tmp_path / "cache",
        "model.dim": 32,
        "model.num_layers": 2,
        "model.num_heads": 2,
        "model.max_seq_len": 32,
        "model.dense_hidden": 64,
        "model.moe.expert_hidden": 32,
        "model.moe.router.num_experts": 4,
        "model.moe.router.num_experts_per_tok": 2,
        "train.steps": 6,
        "train.batch_size": 4,
        "train.log_every": 1,
        "train.eval_every": 3,
        "train.eval_batches": 2,
        "train.checkpoint_every": 2,
        "train.warmup_steps": 1,
        "train.lr": 1e-2,
        "sample.gen_length": 16,
        "sample.block_length": 8,
        "sample.steps": 16,
    }
    return [f"{k}={v}" for k, v in (base | extra).items()]


def losses(run_dir: Path) -> list[tuple[str, str]]:
    with (run_dir / "metrics.csv").open() as f:
        return [(r["step"], r["loss"]) for r in csv.DictReader(f)]


def test_train_sample_eval_on_expert_choice_with_schedule(tmp_path: Path) -> None:
    config = load_run_config(
        None,
        overrides(
            tmp_path,
            "ec",
            **{
                "train.steps": 12,
                "model.moe.router.kind": "expert_choice",
                "model.moe.router.capacity_schedule": "linear_reverse",
                "model.moe.router.k_min": 1,
                "model.moe.router.k_max": 3,
            },
        ),
    )
    summary = Trainer(config, progress=False).fit()
    rows = losses(summary.run_dir)
    assert float(rows[-1][1]) < float(rows[0][1])  # it learns
    assert (summary.run_dir / "loss.png").stat().st_size > 0
    texts = sample_text(summary.run_dir).texts
    assert len(texts) == config.sample.num_samples and all(t.startswith(config.sample.prompt) for t in texts)
    stats = routing_by_mask_ratio(summary.run_dir)
    # linear_reverse: more experts per token at low mask ratio
    assert stats[0]["experts_per_token"] > stats[-1]["experts_per_token"]
    assert eval_ppl(summary.run_dir)["bits_per_byte"] > 0
    bins = json.loads((summary.run_dir / "val_bins.json").read_text())["bins"]
    assert len(bins) >= 3 and all(b["ce"] > 0 and b["tokens"] > 0 for b in bins)


def test_resume_repeats_the_uninterrupted_losses(tmp_path: Path) -> None:
    config = load_run_config(None, overrides(tmp_path, "run", **{"model.moe.router.expert_bias": True}))
    Trainer(config, progress=False).fit()
    expected = losses(tmp_path / "run")
    # lose everything after the step-4 checkpoint, as if the run had died there
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000006")
    Trainer(config, resume=True, progress=False).fit()
    assert losses(tmp_path / "run") == expected


@pytest.mark.slow
def test_resume_after_a_real_kill_is_exact(tmp_path: Path) -> None:
    args = overrides(tmp_path, "killed", **{"train.steps": 40, "train.checkpoint_every": 5})
    cmd = [sys.executable, "-m", "dlmoe", "train", "--no-progress", *args]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (checkpoints / "step_00000010").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (checkpoints / "step_00000010").exists(), "the run never reached its second checkpoint"
    subprocess.run([*cmd, "--resume"], env=env, check=True, capture_output=True)
    reference = overrides(tmp_path, "reference", **{"train.steps": 40, "train.checkpoint_every": 5})
    subprocess.run([sys.executable, "-m", "dlmoe", "train", "--no-progress", *reference], env=env, check=True)
    assert losses(tmp_path / "killed") == losses(tmp_path / "reference")


def test_resume_without_checkpoint_and_bad_config_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no valid checkpoint|does not exist"):
        Trainer(load_run_config(None, overrides(tmp_path, "none")), resume=True, progress=False)
    with pytest.raises(ValueError, match="Did you mean"):
        load_run_config(None, ["train.stpes=3"])
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        load_run_config(None, overrides(tmp_path, "long", **{"data.seq_len": 64}))
    with pytest.raises(ValueError, match="existing path"):
        Trainer(load_run_config(None, overrides(tmp_path, "missing", **{"data.corpus": tmp_path / "nope.txt"})))
    assert not (tmp_path / "missing").exists()  # nothing written for a run that cannot start
    with pytest.raises(ValueError, match="train.device"):
        load_run_config(None, ["train.device=tpu"])


def test_non_finite_loss_stops_with_the_step_and_keeps_checkpoints(tmp_path: Path) -> None:
    trainer = Trainer(load_run_config(None, overrides(tmp_path, "nan", **{"train.steps": 4})), progress=False)
    trainer.fit()
    trainer.config.train.steps = 8
    trainer.model.model.lm_head.weight.data.fill_(float("nan"))
    with pytest.raises(TrainingError, match="step 5"):
        trainer.fit()
    assert (tmp_path / "nan" / "checkpoints" / "step_00000004").exists()


def test_training_noise_follows_the_mask_ratio_range_and_validation_the_full_range(tmp_path: Path) -> None:
    extra = {"train.mask_ratio_min": 0.3, "train.mask_ratio_max": 0.8, "train.loss_weighting": "masked_mean"}
    trainer = Trainer(load_run_config(None, overrides(tmp_path, "range", **extra)), progress=False)
    batch = trainer.data.validation_batches[0]
    t = trainer._loss(batch, torch.Generator().manual_seed(0))[3].t
    assert t.min() >= 0.3 and t.max() < 0.8
    t = trainer._loss(batch, torch.Generator().manual_seed(0), validation=True)[3].t
    assert t.min() < 0.25  # antithetic over U(0, 1): one draw per quarter
    with pytest.raises(ValueError, match=r"train\.mask_ratio_min.*0\.8.*0\.3"):
        load_run_config(None, ["train.mask_ratio_min=0.8", "train.mask_ratio_max=0.3"])
    with pytest.raises(ValueError, match=r"train\.mask_ratio_max.*1\.5"):
        load_run_config(None, ["train.mask_ratio_max=1.5"])
