"""Noise-schedule math of METHOD.md §1: forward noising, parametrisation changes, the
deterministic DDIM `move`, and diffusers' trailing timestep grids.

Timesteps are diffusers indices t in 0..T (T = num_train_timesteps − 1 = 999); t = −1 means
"the clean sample" (abar = 1). Every function here is pure tensor math: no I/O, no devices
chosen, no randomness except what the caller passes in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

CLEAN = -1  # "next timestep" after the last grid point: the clean sample x0
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
# SDXL's noise schedule (stabilityai/stable-diffusion-xl-base-1.0 scheduler/scheduler_config.json):
# scaled-linear betas, 1000 training steps. The embedded digits model is trained on it and the
# tests build their schedules from it.
SDXL_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear")


@dataclass(frozen=True)
class NoiseSchedule:
    """abar[t] (diffusers' `alphas_cumprod`) of the teacher's scheduler, in float64."""

    alphas_cumprod: Tensor

    @classmethod
    def from_scheduler_config(cls, config: Mapping) -> NoiseSchedule:
        """Alphas from a diffusers scheduler config (betas, schedule kind), never constants."""
        from diffusers import DDPMScheduler  # computes betas exactly as every diffusers scheduler

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr")
        sched = DDPMScheduler(**{k: config[k] for k in keys if k in config})
        return cls(sched.alphas_cumprod.to(torch.float64))

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def last_timestep(self) -> int:
        """T: the timestep at which training inputs are pure noise (METHOD.md §1)."""
        return self.num_train_timesteps - 1

    def abar(self, t: Tensor, like: Tensor) -> Tensor:
        """abar_t broadcast to `like`'s rank (B, 1, 1, 1), dtype and device; t = −1 gives 1."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long().reshape(-1)
        padded = torch.cat([self.alphas_cumprod, self.alphas_cumprod.new_ones(1)])
        a = padded[torch.where(t < 0, torch.full_like(t, self.num_train_timesteps), t)]
        return a.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def forward(schedule: NoiseSchedule, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """q(x_t | x0): x_t = sqrt(abar_t)·x0 + sqrt(1 − abar_t)·eps (METHOD.md §1)."""
    a = schedule.abar(t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def training_input(schedule: NoiseSchedule, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t for training: forward(x0, eps, t), except pure noise eps where t = T.

    Inference starts from pure noise at T (abar[T] = 0.0047 is not zero), so training must
    too, or the student learns to use signal it will never see (METHOD.md §1, "Pure noise at T").
    """
    x_t = forward(schedule, x0, eps, t)
    at_T = (torch.as_tensor(t, device=x0.device).reshape(-1) >= schedule.last_timestep)
    return torch.where(at_T.reshape(-1, *([1] * (x0.ndim - 1))), eps, x_t)


def eps_to_x0(schedule: NoiseSchedule, x_t: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x0 = (x_t − sqrt(1 − abar_t)·eps) / sqrt(abar_t)."""
    a = schedule.abar(t, x_t)
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def x0_to_eps(schedule: NoiseSchedule, x_t: Tensor, x0: Tensor, t: Tensor) -> Tensor:
    """eps = (x_t − sqrt(abar_t)·x0) / sqrt(1 − abar_t)."""
    a = schedule.abar(t, x_t)
    return (x_t - a.sqrt() * x0) / (1 - a).sqrt()


@dataclass(frozen=True)
class Prediction:
    """A model output expressed both ways: the clean-sample and the noise estimate."""

    x0: Tensor
    eps: Tensor


def to_prediction(schedule: NoiseSchedule, x_t: Tensor, model_output: Tensor, t: Tensor,
                  prediction_type: str) -> Prediction:
    """Convert a model output in its own parametrisation to (x0, eps) at the boundary."""
    if prediction_type == "epsilon":
        return Prediction(eps_to_x0(schedule, x_t, model_output, t), model_output)
    if prediction_type == "sample":
        return Prediction(model_output, x0_to_eps(schedule, x_t, model_output, t))
    if prediction_type == "v_prediction":
        # v = sqrt(abar)·eps − sqrt(1 − abar)·x0  ⇒  x0 = sqrt(abar)·x_t − sqrt(1 − abar)·v
        a = schedule.abar(t, x_t)
        x0 = a.sqrt() * x_t - (1 - a).sqrt() * model_output
        eps = (1 - a).sqrt() * x_t + a.sqrt() * model_output
        return Prediction(x0, eps)
    raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")


def from_prediction(schedule: NoiseSchedule, pred: Prediction, t: Tensor,
                    prediction_type: str) -> Tensor:
    """The model output in `prediction_type` that corresponds to `pred` at t (inverse of above)."""
    if prediction_type == "epsilon":
        return pred.eps
    if prediction_type == "sample":
        return pred.x0
    if prediction_type == "v_prediction":
        a = schedule.abar(t, pred.x0)
        return a.sqrt() * pred.eps - (1 - a).sqrt() * pred.x0
    raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")


def move(schedule: NoiseSchedule, pred: Prediction, t_next: Tensor) -> Tensor:
    """One deterministic DDIM (eta = 0) step: forward(x0(u), eps(u), t') (METHOD.md §1).

    With t' = −1 (CLEAN) this returns x0. It equals diffusers' EulerDiscreteScheduler step
    between the same timesteps, because Euler on x/sqrt(abar) in sigma = sqrt((1−abar)/abar)
    is exactly DDIM for a fixed (x0, eps) pair.
    """
    return forward(schedule, pred.x0, pred.eps, t_next)


def trailing_grid(num_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """diffusers' `timestep_spacing="trailing"` grid, descending: 4 → [999, 749, 499, 249]."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in 1..{num_train_timesteps}, got {num_steps}")
    ratio = num_train_timesteps / num_steps
    return (np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1).tolist()


def next_timestep(grid: Sequence[int], t: int) -> int:
    """The largest grid timestep below t, or CLEAN (−1) after the last one."""
    below = [s for s in grid if s < t]
    return max(below) if below else CLEAN


def teacher_subgrid(t: int, t_next: int, teacher_steps: int,
                    num_train_timesteps: int = 1000) -> list[int]:
    """The timesteps the teacher starts a `move` from, walking t → t_next: t itself, then every
    point of its trailing grid strictly between t_next and t (METHOD.md §2 step 3).

    When t lies on the teacher's grid (student grids always do) this is exactly the grid slice.
    t may also be off the grid: the 1-step student trains on {999, 749, 499, 249} against a
    2-step teacher, which from 749 steps to its own 499 and then to the clean sample.
    """
    grid = trailing_grid(teacher_steps, num_train_timesteps)
    if not t_next < t <= num_train_timesteps - 1:
        raise ValueError(f"need t_next < t <= {num_train_timesteps - 1}, got t={t}, t_next={t_next}")
    return [t] + [s for s in grid if t_next < s < t]


def student_timesteps(student_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """Default training timesteps of a student (METHOD.md §2 step 1): its own trailing grid,
    except 2- and 1-step students, which train on the 4-step grid {999, 749, 499, 249} so
    they also see intermediate noise levels."""
    return trailing_grid(max(student_steps, 4) if student_steps <= 2 else student_steps,
                         num_train_timesteps)


def pipeline_start(schedule: NoiseSchedule, noise: Tensor) -> Tensor:
    """The x_T that diffusers' trailing Euler pipelines start from, in x_t space.

    `EulerDiscreteScheduler(timestep_spacing="trailing").init_noise_sigma` is sigma_max (not
    sqrt(sigma_max² + 1)), so the pipeline's first UNet input is sqrt(1 − abar_T)·noise. A
    sampler that starts here reproduces the pipeline bit for bit; training uses pure noise,
    which differs by a factor of sqrt(1 − 0.0047) ≈ 0.998 at SDXL's T.
    """
    return noise * (1 - schedule.alphas_cumprod[-1]).sqrt().to(noise.dtype)
