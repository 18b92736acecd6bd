"""Block-causal models train on two streams [x_t ; x_0]: the trainer's loss is the two-stream loss,
a tiny run learns, and its exact-cache samples equal uncached ones."""

from pathlib import Path

import pytest
import torch

from dlmoe.config_io import load_run_config
from dlmoe.diffusion.loss import masked_diffusion_loss
from dlmoe.diffusion.noise import add_mask_noise
from dlmoe.sampling import generate
from dlmoe.train import Trainer
from tests.train.test_trainer import overrides

BLOCK = 8  # attention block = sampling block
STEPS = 12


@pytest.fixture(scope="module")
def trainer(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    """A fresh tiny block-causal run (fp32: exact comparisons, and fast on the CPU)."""
    options = {
        "model.attention": "block_causal",
        "model.attention_block_size": BLOCK,
        "sample.block_length": BLOCK,
        "train.dtype": "fp32",
        "train.steps": STEPS,
    }
    config = load_run_config(None, overrides(tmp_path_factory.mktemp("bd"), "bd", **options))
    return Trainer(config, progress=False)


@torch.no_grad()
def test_block_causal_trainer_loss_is_the_two_stream_loss(trainer: Trainer) -> None:
    batch = trainer.data.validation_batches[0]
    diff, _, _, noised = trainer._loss(batch, torch.Generator().manual_seed(5), weighting="elbo", validation=True)
    again = add_mask_noise(
        batch, trainer.config.model.mask_id, antithetic=True, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(again.noisy_ids, noised.noisy_ids)
    two_stream = trainer.model(noised.noisy_ids, mask_ratio=noised.mask_ratio, clean_input_ids=batch).logits
    single = trainer.model(noised.noisy_ids, mask_ratio=noised.mask_ratio).logits
    expected = masked_diffusion_loss(two_stream, batch, noised.masked, noised.mask_ratio, weighting="elbo")
    torch.testing.assert_close(diff.loss, expected.loss)
    noisy_earlier = masked_diffusion_loss(single, batch, noised.masked, noised.mask_ratio, weighting="elbo")
    assert abs(float(noisy_earlier.loss - diff.loss)) > 1e-4  # earlier blocks are seen clean, not noisy


def test_tiny_block_diffusion_run_learns_and_samples_exactly_with_the_cache(trainer: Trainer) -> None:
    rows = [trainer.train_step(routing_stats=False)["loss"] for _ in range(STEPS)]
    assert sum(rows[-3:]) < sum(rows[:3])  # it learns
    assert trainer.evaluate()["val_loss"] > 0  # validation runs on two streams too
    model = trainer.model.eval()
    batch = trainer.data.validation_batches[0]
    prompts = [batch[0, :5].tolist(), batch[1, :3].tolist()]  # different lengths: a left-padded canvas
    options = {"gen_length": 16, "block_length": BLOCK, "steps": 8}
    plain = generate(model, prompts, cache="none", **options)
    exact = generate(model, prompts, cache="exact", **options)
    assert torch.equal(exact.tokens, plain.tokens)
    assert exact.stats.tokens_fed < plain.stats.tokens_fed


def test_block_diffusion_config_decodes_in_its_attention_blocks() -> None:
    config = load_run_config(Path(__file__).parents[2] / "configs" / "block_diffusion.yaml")
    assert config.model.attention == "block_causal"
    assert config.model.attention_block_size == config.sample.block_length
    assert config.model.moe.router.kind == "token_choice"  # per-token routing: the exact cache is exact
