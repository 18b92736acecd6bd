"""Forward noising (t range) and the losses (ELBO, stable, masked_mean)."""

import pytest
import torch
import torch.nn.functional as F

from dlmoe.config import LOSS_WEIGHTINGS
from dlmoe.diffusion.loss import WEIGHTINGS, loss_by_mask_ratio_bin, masked_diffusion_loss
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


def test_default_range_draws_are_the_unscaled_uniforms_bit_for_bit() -> None:
    # resumed / reproduced runs depend on it: the range option must not change the default noise
    for antithetic in (False, True):
        t = sample_t(8, antithetic=antithetic, generator=torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(3)
        u = (torch.rand((), generator=g) + torch.arange(8) / 8) % 1.0 if antithetic else torch.rand(8, generator=g)
        assert torch.equal(t, u)


def test_t_range_keeps_draws_inside_and_antithetic_strata_inside_the_range() -> None:
    t = sample_t(4096, generator=torch.Generator().manual_seed(0), t_min=0.3, t_max=0.8)
    assert t.min() >= 0.3 and t.max() < 0.8 and abs(t.mean().item() - 0.55) < 0.01
    t = sample_t(8, antithetic=True, generator=torch.Generator().manual_seed(1), t_min=0.3, t_max=0.8)
    assert sorted(((t - 0.3) / 0.5 * 8).long().tolist()) == list(range(8))  # one draw per stratum of [0.3, 0.8)
    batch = add_mask_noise(torch.randint(0, MASK, (64, 8)), MASK, generator=torch.Generator(), t_min=0.3, t_max=0.8)
    assert batch.t.min() >= 0.3 and batch.t.max() < 0.8


@pytest.mark.parametrize(
    ("t_min", "t_max", "match"),
    [
        (0.8, 0.3, r"t_min.*0\.8.*t_max.*0\.3"),
        (0.5, 0.5, r"t_min.*0\.5"),
        (-0.1, 0.5, r"t_min.*-0\.1"),
        (0.0, 1.5, r"t_max.*1\.5"),
    ],
)
def test_bad_t_range_is_refused(t_min: float, t_max: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sample_t(4, t_min=t_min, t_max=t_max)


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


def test_masked_mean_is_the_mean_ce_over_masked_tokens() -> None:
    # dMoE's objective, by hand: tokens (0,0) (0,2) (1,1) masked
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 3.0], [5.0, 0.0]]])
    targets = torch.tensor([[0, 1, 0], [1, 1, 0]])
    masked = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    # two classes: CE = softplus(-margin), margin = target logit - other logit = 2, -1, 3
    by_hand = F.softplus(-torch.tensor([2.0, -1.0, 3.0])).sum() / 3
    out = masked_diffusion_loss(logits, targets, masked, masked.float().mean(1), weighting="masked_mean")
    torch.testing.assert_close(out.loss, by_hand)
    assert int(out.num_masked) == 3
    assert LOSS_WEIGHTINGS == WEIGHTINGS  # the config accepts exactly what the loss implements
