"""One validation ELBO: `dlmoe eval --validation` (`eval_ppl`) gives the trainer's own numbers for the
same run and seed, antithetic or not, single- or two-stream."""

from pathlib import Path

import pytest

from dlmoe.config_io import load_run_config
from dlmoe.diffusion import bits_per_byte, perplexity_bound
from dlmoe.inference import eval_ppl
from dlmoe.train import Trainer
from tests.train.test_trainer import overrides


@pytest.mark.parametrize(
    "extra",
    [
        {"train.antithetic": False},  # eval_ppl used to force antithetic noise here
        {"model.attention": "block_causal", "model.attention_block_size": 8, "sample.block_length": 8},
    ],
)
def test_eval_ppl_equals_the_trainers_validation(tmp_path: Path, extra: dict) -> None:
    options = {"train.steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2, "train.dtype": "fp32"} | extra
    trainer = Trainer(load_run_config(None, overrides(tmp_path, "run", **options)), progress=False)
    summary = trainer.fit()
    result = eval_ppl(summary.run_dir)
    # fp32, the same weights, batches and noise: the same number, not merely a close one
    assert result["val_elbo_nats_per_token"] == summary.val_loss
    assert result["bits_per_byte"] == summary.val_bits_per_byte
    assert summary.val_bits_per_byte == bits_per_byte(summary.val_loss, trainer.data.bytes_per_token)
    assert result["ppl_upper_bound"] == perplexity_bound(summary.val_loss)
    assert eval_ppl(summary.run_dir, seed=5)["val_elbo_nats_per_token"] != summary.val_loss  # the seed is the noise
    with pytest.raises(ValueError, match="num_batches"):
        eval_ppl(summary.run_dir, num_batches=-1)
