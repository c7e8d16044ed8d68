"""Re-noising the discriminator's inputs (METHOD.md §3, 1-step and 2-step stages).

The teacher's x_target and the student's x_hat are treated as x0 estimates and both noised
to one drawn t* with one shared fresh noise, so the discriminator compares them at the same
noise level with the same noise: their difference is sqrt(abar_t*)·(x0_real − x0_fake) and
carries no noise of its own. Without this a 1-step student gets feedback only on fine detail
and diverges (paper §3.3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from distill.schedule import NoiseSchedule, forward

DEFAULT_TIMESTEPS = (10, 250, 500, 750)  # t* choices (METHOD.md §3)


@dataclass(frozen=True)
class Renoised:
    """Discriminator inputs at t*: real (from the teacher), fake (from the student), t* (B,)."""

    real: Tensor
    fake: Tensor
    t: Tensor


def sample_renoise_timesteps(batch_size: int, timesteps: Sequence[int], weights: Sequence[float],
                             generator: torch.Generator) -> Tensor:
    """t* per sample, drawn from `timesteps` with probabilities ∝ `weights` (long, (B,), on
    the generator's device). The loop passes 1:1:1:1, then 5:1:1:1 after its switch step."""
    if len(timesteps) != len(weights) or not timesteps:
        raise ValueError(f"need one weight per timestep, got {list(timesteps)} and {list(weights)}")
    w = torch.as_tensor(weights, dtype=torch.float64, device=generator.device)
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    idx = torch.multinomial(w, batch_size, replacement=True, generator=generator)
    return torch.as_tensor(timesteps, dtype=torch.long, device=generator.device)[idx]


def renoise(schedule: NoiseSchedule, x0_real: Tensor, x0_fake: Tensor,
            timesteps: Sequence[int], weights: Sequence[float],
            generator: torch.Generator) -> Renoised:
    """forward(x0_real, eps, t*) and forward(x0_fake, eps, t*) with ONE shared eps and t*.

    Gradients flow from `fake` to x0_fake (the G step needs them); the noise and t* come
    from `generator` only, so a seeded generator reproduces them.
    """
    if x0_real.shape != x0_fake.shape:
        raise ValueError(f"real and fake shapes differ: {tuple(x0_real.shape)} vs {tuple(x0_fake.shape)}")
    t = sample_renoise_timesteps(x0_real.shape[0], timesteps, weights, generator)
    eps = torch.randn(x0_real.shape, generator=generator, device=generator.device)
    eps, t = eps.to(device=x0_real.device, dtype=x0_real.dtype), t.to(x0_real.device)
    return Renoised(forward(schedule, x0_real, eps, t), forward(schedule, x0_fake, eps, t), t)
