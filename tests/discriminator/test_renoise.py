"""Re-noising of the discriminator inputs (METHOD.md §3): one shared noise, weighted t*."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from discriminator.renoise import DEFAULT_TIMESTEPS, renoise, sample_renoise_timesteps
from distill.schedule import SDXL_SCHEDULER_CONFIG, NoiseSchedule, forward


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_scheduler_config(SDXL_SCHEDULER_CONFIG)


def x0_pair(seed: int = 0, batch: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.randn(batch, 4, 8, 8, generator=g)


def test_real_and_fake_share_one_noise(schedule):
    x0_real, x0_fake = x0_pair()
    out = renoise(schedule, x0_real, x0_fake, DEFAULT_TIMESTEPS, (1, 1, 1, 1),
                  torch.Generator().manual_seed(0))
    a = schedule.abar(out.t, x0_real)
    torch.testing.assert_close(out.real - out.fake, a.sqrt() * (x0_real - x0_fake))
    eps_real = (out.real - a.sqrt() * x0_real) / (1 - a).sqrt()
    eps_fake = (out.fake - a.sqrt() * x0_fake) / (1 - a).sqrt()
    torch.testing.assert_close(eps_real, eps_fake)
    torch.testing.assert_close(out.real, forward(schedule, x0_real, eps_real, out.t))
    assert 0.5 < eps_real.std() < 1.5  # fresh standard noise, not zeros
    assert set(out.t.tolist()) <= set(DEFAULT_TIMESTEPS) and out.t.shape == (6,)


def test_seeded_and_differentiable_in_the_fake_only(schedule):
    x0_real, x0_fake = x0_pair()
    x0_fake.requires_grad_(True)
    a = renoise(schedule, x0_real, x0_fake, DEFAULT_TIMESTEPS, (1, 1, 1, 1),
                torch.Generator().manual_seed(5))
    b = renoise(schedule, x0_real, x0_fake, DEFAULT_TIMESTEPS, (1, 1, 1, 1),
                torch.Generator().manual_seed(5))
    torch.testing.assert_close(a.fake, b.fake)
    assert torch.equal(a.t, b.t)
    assert not a.real.requires_grad
    a.fake.sum().backward()
    torch.testing.assert_close(x0_fake.grad, schedule.abar(a.t, x0_fake).sqrt().expand_as(x0_fake))


@pytest.mark.parametrize("weights", [(1, 1, 1, 1), (5, 1, 1, 1)])
def test_timestep_frequencies_follow_the_weights(weights):
    n = 20_000
    t = sample_renoise_timesteps(n, DEFAULT_TIMESTEPS, weights, torch.Generator().manual_seed(0))
    counts = [(t == s).sum().item() for s in DEFAULT_TIMESTEPS]
    expected = [n * w / sum(weights) for w in weights]
    assert sum(counts) == n
    assert chisquare(counts, expected).pvalue > 1e-3
    # the other weighting is rejected: the check can fail
    other = (5, 1, 1, 1) if weights == (1, 1, 1, 1) else (1, 1, 1, 1)
    assert chisquare(counts, [n * w / sum(other) for w in other]).pvalue < 1e-6


def test_zero_weights_are_never_drawn_and_bad_weights_refused():
    t = sample_renoise_timesteps(500, DEFAULT_TIMESTEPS, (0, 1, 0, 0), torch.Generator().manual_seed(0))
    assert t.unique().tolist() == [250]
    with pytest.raises(ValueError):
        sample_renoise_timesteps(4, DEFAULT_TIMESTEPS, (1, 1), torch.Generator())
    with pytest.raises(ValueError):
        sample_renoise_timesteps(4, DEFAULT_TIMESTEPS, (0, 0, 0, 0), torch.Generator())
