"""Closed-form and diffusers-equivalence tests of distill/schedule.py (METHOD.md §1)."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from distill.schedule import (
    CLEAN,
    SDXL_SCHEDULER_CONFIG,
    NoiseSchedule,
    Prediction,
    eps_to_x0,
    forward,
    from_prediction,
    move,
    next_timestep,
    pipeline_start,
    student_timesteps,
    teacher_subgrid,
    to_prediction,
    trailing_grid,
    training_input,
    x0_to_eps,
)


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_scheduler_config(SDXL_SCHEDULER_CONFIG)


def euler(num_steps: int, prediction_type: str) -> EulerDiscreteScheduler:
    sched = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG, timestep_spacing="trailing",
                                   prediction_type=prediction_type)
    sched.set_timesteps(num_steps)
    return sched


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_sdxl_schedule_values(schedule):
    assert schedule.num_train_timesteps == 1000 and schedule.last_timestep == 999
    assert schedule.alphas_cumprod.dtype == torch.float64
    assert schedule.alphas_cumprod[-1].item() == pytest.approx(0.0047, abs=5e-5)
    ref = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG).alphas_cumprod.double()
    torch.testing.assert_close(schedule.alphas_cumprod, ref, rtol=0, atol=0)


def test_abar_of_clean_is_one(schedule):
    like = torch.zeros(3, 4, 2, 2, dtype=torch.float64)
    a = schedule.abar(torch.tensor([CLEAN, 0, 999]), like)
    assert a.shape == (3, 1, 1, 1)
    assert a[0].item() == 1.0
    assert a[1].item() == schedule.alphas_cumprod[0].item()
    assert a[2].item() == schedule.alphas_cumprod[999].item()


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_parametrisations_round_trip(schedule, prediction_type):
    x0, eps = randn(4, 4, 3, 3, seed=1), randn(4, 4, 3, 3, seed=2)
    t = torch.tensor([999, 749, 10, 0])
    x_t = forward(schedule, x0, eps, t)
    torch.testing.assert_close(eps_to_x0(schedule, x_t, eps, t), x0)
    torch.testing.assert_close(x0_to_eps(schedule, x_t, x0, t), eps, rtol=1e-9, atol=1e-9)
    truth = Prediction(x0, eps)
    out = from_prediction(schedule, truth, t, prediction_type)
    back = to_prediction(schedule, x_t, out, t, prediction_type)
    torch.testing.assert_close(back.x0, x0)
    torch.testing.assert_close(back.eps, eps, rtol=1e-9, atol=1e-9)


def test_v_prediction_definition(schedule):
    x0, eps, t = randn(2, 4, 2, 2, seed=3), randn(2, 4, 2, 2, seed=4), torch.tensor([500, 100])
    a = schedule.abar(t, x0)
    v = from_prediction(schedule, Prediction(x0, eps), t, "v_prediction")
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0)


def test_unknown_prediction_type_fails(schedule):
    x = randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="prediction_type"):
        to_prediction(schedule, x, x, torch.tensor([5]), "flow")


def test_training_input_is_pure_noise_only_at_T(schedule):
    x0, eps = randn(5, 4, 2, 2, seed=5), randn(5, 4, 2, 2, seed=6)
    t = torch.tensor([999, 998, 749, 0, 999])
    x_t = training_input(schedule, x0, eps, t)
    for i, ti in enumerate(t.tolist()):
        if ti == 999:
            assert torch.equal(x_t[i], eps[i])
        else:
            torch.testing.assert_close(x_t[i], forward(schedule, x0[i:i + 1], eps[i:i + 1],
                                                       t[i:i + 1])[0])
            assert not torch.allclose(x_t[i], eps[i])
    # At T forward() itself is not pure noise: abar[999] = 0.0047 leaves signal in.
    assert not torch.allclose(forward(schedule, x0, eps, t)[0], eps[0])


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8, 32, 128])
def test_trailing_grid_matches_diffusers(num_steps):
    ref = euler(num_steps, "epsilon").timesteps.long().tolist()
    assert trailing_grid(num_steps) == ref
    assert len(ref) == num_steps and ref[0] == 999


def test_trailing_grid_known_values():
    assert trailing_grid(1) == [999]
    assert trailing_grid(2) == [999, 499]
    assert trailing_grid(4) == [999, 749, 499, 249]
    assert trailing_grid(8) == [999, 874, 749, 624, 499, 374, 249, 124]
    with pytest.raises(ValueError):
        trailing_grid(0)


def test_next_timestep():
    grid = trailing_grid(4)
    assert next_timestep(grid, 999) == 749
    assert next_timestep(grid, 749) == 499
    assert next_timestep(grid, 249) == CLEAN
    assert next_timestep(trailing_grid(2), 749) == 499
    assert next_timestep(trailing_grid(1), 749) == CLEAN


def test_teacher_subgrid():
    assert teacher_subgrid(999, 749, 8) == [999, 874]
    assert teacher_subgrid(249, CLEAN, 8) == [249, 124]
    assert teacher_subgrid(999, 499, 4) == [999, 749]
    assert teacher_subgrid(999, CLEAN, 1) == [999]
    assert teacher_subgrid(999, CLEAN, 4) == [999, 749, 499, 249]
    # 128 → 32: every 32-step point lies on the 128-step grid, 4 teacher steps per student step.
    grid32, grid128 = trailing_grid(32), trailing_grid(128)
    for t in grid32:
        sub = teacher_subgrid(t, next_timestep(grid32, t), 128)
        assert len(sub) == 4 and set(sub) <= set(grid128)
    # Off-grid start (1-step student trained at 749 against the 2-step teacher).
    assert teacher_subgrid(749, CLEAN, 2) == [749, 499]
    assert teacher_subgrid(249, CLEAN, 2) == [249]
    with pytest.raises(ValueError):
        teacher_subgrid(499, 499, 8)


def test_student_timesteps():
    assert student_timesteps(1) == [999, 749, 499, 249]
    assert student_timesteps(2) == [999, 749, 499, 249]
    assert student_timesteps(4) == [999, 749, 499, 249]
    assert student_timesteps(8) == trailing_grid(8)
    assert student_timesteps(32) == trailing_grid(32)


def test_pipeline_start_is_euler_first_model_input(schedule):
    noise = randn(2, 4, 3, 3, seed=7)
    sched = euler(4, "epsilon")
    first_input = sched.scale_model_input(noise * sched.init_noise_sigma, sched.timesteps[0])
    torch.testing.assert_close(pipeline_start(schedule, noise), first_input, rtol=1e-6, atol=1e-6)


def fake_model(x_t: torch.Tensor, t: int) -> torch.Tensor:
    """A deterministic nonlinear "model output" of (x_t, t), fed identically to both samplers."""
    w = randn(*x_t.shape[1:], seed=100 + t)
    return torch.tanh(x_t) * 0.7 + w * 0.5


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("num_steps", [1, 2, 4, 8])
def test_move_matches_euler_step_for_step(schedule, num_steps, prediction_type):
    """METHOD.md §1: `move` is diffusers' trailing EulerDiscreteScheduler. Euler's latent is
    x_t / sqrt(abar_t); its scaled model input is x_t itself; at the end both are x0."""
    noise = randn(2, 4, 4, 4, seed=11)
    sched = euler(num_steps, prediction_type)
    x_ours = pipeline_start(schedule, noise)
    latent = noise * sched.init_noise_sigma
    grid = trailing_grid(num_steps)
    for t_float, t in zip(sched.timesteps, grid):
        model_input = sched.scale_model_input(latent, t_float)
        torch.testing.assert_close(model_input, x_ours, rtol=1e-5, atol=1e-5)
        out = fake_model(x_ours, t)
        latent = sched.step(out, t_float, latent).prev_sample
        t_batch = torch.full((2,), t)
        t_next = next_timestep(grid, t)
        x_ours = move(schedule, to_prediction(schedule, x_ours, out, t_batch, prediction_type),
                      torch.full((2,), t_next))
        abar_next = schedule.abar(torch.tensor([t_next]), x_ours)
        torch.testing.assert_close(latent * abar_next.sqrt(), x_ours, rtol=1e-5, atol=1e-5)
    # After the last step Euler's latent (sigma = 0) and ours are both the clean estimate.
    torch.testing.assert_close(latent, x_ours, rtol=1e-5, atol=1e-5)


def gaussian_x0(schedule, x_t, t, mu, var):
    """E[x0 | x_t] for data x0 ~ N(mu, var·I): mu + sqrt(a)·var/(a·var + 1 − a)·(x_t − sqrt(a)·mu)."""
    a = schedule.abar(t, x_t)
    return mu + a.sqrt() * var / (a * var + 1 - a) * (x_t - a.sqrt() * mu)


def walk_exact_teacher(schedule, x, t, t_next, teacher_steps, mu, var):
    steps = teacher_subgrid(t, t_next, teacher_steps) + [t_next]
    for s, s_next in zip(steps[:-1], steps[1:]):
        ts = torch.full((x.shape[0],), s)
        pred = to_prediction(schedule, x, gaussian_x0(schedule, x, ts, mu, var), ts, "sample")
        x = move(schedule, pred, torch.full((x.shape[0],), s_next))
    return x


@pytest.mark.parametrize("t,t_next", [(999, 499), (749, 249), (499, CLEAN), (999, CLEAN)])
def test_exact_teacher_on_point_mass_is_path_independent(schedule, t, t_next):
    """With data a point mass at mu the exact x0 is mu everywhere, so DDIM paths are straight
    in x/sqrt(abar): n teacher steps from t to t' land exactly where one step lands."""
    mu = randn(1, 4, 3, 3, seed=20)
    x = forward(schedule, mu.expand(3, -1, -1, -1), randn(3, 4, 3, 3, seed=21), torch.tensor([t] * 3))
    one = walk_exact_teacher(schedule, x, t, t_next, 1, mu, 0.0)
    assert teacher_subgrid(t, t_next, 1) == [t]
    for steps in (8, 32, 128):
        many = walk_exact_teacher(schedule, x, t, t_next, steps, mu, 0.0)
        torch.testing.assert_close(many, one, rtol=1e-10, atol=1e-10)
    if t_next == CLEAN:
        torch.testing.assert_close(one, mu.expand_as(one), rtol=1e-10, atol=1e-10)


def test_exact_teacher_on_unit_gaussian_closed_form(schedule):
    """Data N(mu, I): with the exact posterior mean one DDIM step maps the deviation
    y = x_t − sqrt(abar_t)·mu to cos(θ_t − θ_t')·y, θ = arccos(sqrt(abar)). It is *not*
    path-independent (cos a·cos b ≠ cos(a + b)), but converges to the exact probability-flow
    ODE, which for unit variance keeps y fixed, as the teacher grid gets finer."""
    mu = randn(1, 4, 3, 3, seed=30)
    x = forward(schedule, mu + randn(2, 4, 3, 3, seed=31), randn(2, 4, 3, 3, seed=32),
                torch.tensor([999, 999]))
    y = x - schedule.alphas_cumprod[999].sqrt() * mu
    theta = torch.arccos(torch.cat([schedule.alphas_cumprod, torch.ones(1)]).sqrt())  # [-1] = clean
    errors = []
    for steps in (1, 4, 8, 32, 128):
        out = walk_exact_teacher(schedule, x, 999, 499, steps, mu, 1.0)
        walk = teacher_subgrid(999, 499, steps) + [499]
        factor = math.prod(math.cos(theta[a] - theta[b]) for a, b in zip(walk[:-1], walk[1:]))
        y_out = out - schedule.alphas_cumprod[499].sqrt() * mu
        torch.testing.assert_close(y_out, factor * y, rtol=1e-10, atol=1e-10)
        errors.append((y_out - y).abs().max().item())
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.02 * errors[0]
