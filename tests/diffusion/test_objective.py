"""The objective's one path (noise → forward → loss): equal to the steps written out, the clean stream
only for two-stream models, data-parallel row slices that add up to the whole batch, clear errors."""

import pytest
import torch
import torch.nn.functional as F

from dlmoe.config import ModelConfig, MoEConfig, RouterConfig
from dlmoe.diffusion import add_mask_noise, diffusion_loss
from dlmoe.model.transformer import DiffusionTransformer

MASK, L = 0, 16


def tiny_model(attention: str = "bidirectional") -> DiffusionTransformer:
    """Random weights, 2 layers, token-choice MoE; block-causal with blocks of 4 (two streams)."""
    torch.manual_seed(0)
    router = RouterConfig(kind="token_choice", num_experts=4, num_experts_per_tok=2)
    config = ModelConfig(
        vocab_size=23, dim=16, num_layers=2, num_heads=2, max_seq_len=L, dense_hidden=32,
        moe=MoEConfig(router=router, expert_hidden=16), mask_id=MASK, eos_id=1, pad_id=2, init_std=0.3,
        attention=attention, attention_block_size=4,
    )  # fmt: skip
    return DiffusionTransformer(config).eval()


def tokens(rows: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 23, (rows, L), generator=torch.Generator().manual_seed(seed))


def elbo_by_hand(logits: torch.Tensor, batch: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """(1 / (B·L)) Σ_b (1 / r_b) Σ_{i masked} −log p(x_i)."""
    logp = F.log_softmax(logits.double(), -1).gather(-1, batch[..., None])[..., 0]
    rows = [-(logp[b][masked[b]]).sum() / masked[b].double().mean() for b in range(batch.shape[0])]
    return torch.stack(rows).sum() / batch.numel()


@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
@torch.no_grad()
def test_loss_is_noise_then_forward_then_elbo(attention: str) -> None:
    model, batch = tiny_model(attention), tokens()
    two_stream = model.config.block_causal
    out = diffusion_loss(
        model, batch, mask_id=MASK, two_stream=two_stream, generator=torch.Generator().manual_seed(7), antithetic=True
    )
    noised = add_mask_noise(batch, MASK, antithetic=True, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out.noised.noisy_ids, noised.noisy_ids)  # the same draws from the given generator
    clean = batch if two_stream else None
    logits = model(noised.noisy_ids, mask_ratio=noised.mask_ratio, clean_input_ids=clean).logits
    torch.testing.assert_close(out.loss.loss.double(), elbo_by_hand(logits, batch, noised.masked))
    if two_stream:  # the clean stream changes what x_t sees: leaving it out is a different loss
        single = model(noised.noisy_ids, mask_ratio=noised.mask_ratio).logits
        assert abs(float(elbo_by_hand(single, batch, noised.masked) - out.loss.loss)) > 1e-4
    diff, aux, dispatches, noised_again = out  # unpacks as the trainer's old tuple
    assert diff is out.loss and noised_again is out.noised and len(dispatches) == 2 and aux.ndim == 0


@torch.no_grad()
def test_rank_slices_see_the_global_noise_and_add_up_to_the_batch() -> None:
    model, batch = tiny_model(), tokens(rows=4)
    whole = diffusion_loss(model, batch, mask_id=MASK, two_stream=False, generator=torch.Generator().manual_seed(3))
    parts = [
        diffusion_loss(
            model,
            batch,
            mask_id=MASK,
            two_stream=False,
            generator=torch.Generator().manual_seed(3),
            rows=lambda x, r=r: x[2 * r : 2 * r + 2],
        )  # fmt: skip
        for r in range(2)
    ]
    assert torch.equal(torch.cat([p.noised.masked for p in parts]), whole.noised.masked)
    # the ELBO is a mean over rows: the mean of the two halves' losses is the whole batch's
    torch.testing.assert_close((parts[0].loss.loss + parts[1].loss.loss) / 2, whole.loss.loss)


def test_training_range_and_weighting_reach_the_noise_and_the_loss() -> None:
    model, batch = tiny_model(), tokens(rows=8)
    out = diffusion_loss(
        model, batch, mask_id=MASK, two_stream=False, generator=torch.Generator().manual_seed(0), t_min=0.3,
        t_max=0.8, weighting="masked_mean",
    )  # fmt: skip
    assert out.noised.t.min() >= 0.3 and out.noised.t.max() < 0.8
    mean_ce = out.loss.token_ce.sum() / out.noised.masked.sum()
    torch.testing.assert_close(out.loss.loss, mean_ce)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"weighting": "bogus"}, "weighting"),
        ({"two_stream": 1}, "two_stream"),
        ({"mask_id": -1}, "mask_id"),
        ({"generator": None}, "CPU torch.Generator"),
        ({"t_min": 0.9, "t_max": 0.2}, "t_min"),
    ],
)
def test_bad_input_is_refused_before_the_forward(options: dict, match: str) -> None:
    def forward(*args, **kwargs):
        raise AssertionError("no forward for bad input")

    kwargs = {"mask_id": MASK, "two_stream": False, "generator": torch.Generator()} | options
    with pytest.raises(ValueError, match=match):
        diffusion_loss(forward, tokens(), **kwargs)
