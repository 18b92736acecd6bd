"""Forward noising and the ELBO loss."""

import pytest
import torch
import torch.nn.functional as F

from dlmoe.diffusion.loss import loss_by_mask_ratio_bin, masked_diffusion_loss
from dlmoe.diffusion.noise import add_mask_noise, sample_t

MASK = 99


def test_every_row_has_a_masked_token_and_ratio_is_realized() -> None:
    x = torch.randint(0, MASK, (64, 16))
    batch = add_mask_noise(x, MASK, t=torch.zeros(64))  # t = 0 would mask nothing
    assert bool(batch.masked.any(1).all())
    torch.testing.assert_close(batch.mask_ratio, batch.masked.float().mean(1))
    assert torch.equal(batch.noisy_ids[batch.masked], torch.full_like(x[batch.masked], MASK))
    assert torch.equal(batch.noisy_ids[~batch.masked], x[~batch.masked])


def test_mask_rate_follows_t() -> None:
    x = torch.randint(0, MASK, (4, 4000))
    batch = add_mask_noise(x, MASK, t=torch.tensor([0.1, 0.4, 0.7, 0.95]), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(batch.mask_ratio, torch.tensor([0.1, 0.4, 0.7, 0.95]), atol=0.03, rtol=0)


def test_antithetic_t_is_stratified() -> None:
    t = sample_t(8, antithetic=True, generator=torch.Generator().manual_seed(1))
    assert sorted((t * 8).long().tolist()) == list(range(8))  # one draw per stratum


def test_elbo_loss_matches_formula_and_stable_drops_weight() -> None:
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    masked = torch.tensor([[1, 0, 1, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    ratio = masked.float().mean(1)
    ce = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), reduction="none").view(2, 5) * masked
    expected = (ce.sum(1) / ratio).sum() / 10
    out = masked_diffusion_loss(logits, targets, masked, ratio)
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(
        masked_diffusion_loss(logits, targets, masked, ratio, weighting="stable").loss, ce.sum() / 10
    )
    with pytest.raises(ValueError, match="weighting"):
        masked_diffusion_loss(logits, targets, masked, ratio, weighting="bogus")


def test_bins_accumulate_ce_and_counts() -> None:
    ce = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    masked = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    s, n = loss_by_mask_ratio_bin(ce, masked, torch.tensor([1.0, 0.5]), num_bins=4)
    assert s.tolist() == [0.0, 0.0, 3.0, 3.0] and n.tolist() == [0.0, 0.0, 1.0, 2.0]
