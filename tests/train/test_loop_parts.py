"""Pieces of the loop that are pure enough to test without a run: LR schedule, EMA, draws."""

import math

import pytest
import torch

from distill.phases import PhaseConfig, StageConfig, expand_recipe
from distill.schedule import SDXL_SCHEDULER_CONFIG, NoiseSchedule, trailing_grid
from train.build import EMA, lr_factor
from train.steps import draw_point


def test_lr_factor_warmup_then_constant_or_cosine():
    assert lr_factor(0, 100, 10, "constant") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "constant") == pytest.approx(1.0)
    assert lr_factor(50, 100, 10, "constant") == 1.0
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.99)))


def test_ema_tracks_and_round_trips():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.9)
    with torch.no_grad():
        p.fill_(1.0)
    ema.update()
    assert torch.allclose(ema.shadow[0], torch.full((3,), 0.1))
    state = ema.state_dict()
    other = EMA([p], decay=0.9)
    other.load_state_dict(state)
    other.copy_to_params()
    assert torch.allclose(p.detach(), torch.full((3,), 0.1))


def test_draw_point_uses_the_phase_timesteps_and_the_students_next_grid_point():
    stage = StageConfig(teacher_steps=4, student_steps=2, phases=[PhaseConfig(kind="mse", steps=1)])
    plan = expand_recipe([stage])[0]
    schedule = NoiseSchedule.from_scheduler_config(SDXL_SCHEDULER_CONFIG)
    x0 = torch.randn(256, 4, 2, 2)
    point = draw_point(plan, schedule, x0, torch.Generator().manual_seed(0))
    assert set(point.t.tolist()) == {999, 749, 499, 249}
    grid = trailing_grid(2)
    expected = {999: 499, 749: 499, 499: -1, 249: -1}
    assert all(expected[a] == b for a, b in zip(point.t.tolist(), point.t_next.tolist()))
    assert grid == [999, 499]
    again = draw_point(plan, schedule, x0, torch.Generator().manual_seed(0))
    assert torch.equal(point.x_t, again.x_t)  # seeded
    # pure noise where t = T (METHOD.md §1): x_t there does not depend on x0 at all
    other = draw_point(plan, schedule, x0 + 5.0, torch.Generator().manual_seed(0))
    at_T = point.t == 999
    assert torch.equal(point.x_t[at_T], other.x_t[at_T])
    assert not torch.allclose(point.x_t[~at_T], other.x_t[~at_T])
