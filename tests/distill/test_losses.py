"""GAN losses and R1 (METHOD.md §3) at known logits, in closed form."""

from __future__ import annotations

import math

import torch

from distill.losses import (
    hinge_d_loss,
    hinge_g_loss,
    nonsaturating_d_loss,
    nonsaturating_g_loss,
    r1_penalty,
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_nonsaturating_at_zero_logits_is_log_two():
    zeros = torch.zeros(4)
    out = nonsaturating_d_loss(zeros, zeros)
    torch.testing.assert_close(out.loss, torch.tensor(2 * math.log(2)))
    torch.testing.assert_close(nonsaturating_g_loss(zeros), torch.tensor(math.log(2)))
    assert out.real_accuracy == 0 and out.fake_accuracy == 0  # 0 is neither > 0 nor < 0


def test_nonsaturating_known_values():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([-3.0, 0.5])
    expected_d = (softplus(-2.0) + softplus(1.0)) / 2 + (softplus(-3.0) + softplus(0.5)) / 2
    out = nonsaturating_d_loss(real, fake)
    torch.testing.assert_close(out.loss, torch.tensor(expected_d))
    torch.testing.assert_close(nonsaturating_g_loss(fake),
                               torch.tensor((softplus(3.0) + softplus(-0.5)) / 2))
    assert out.real_accuracy == 0.5 and out.fake_accuracy == 0.5


def test_nonsaturating_is_stable_at_large_logits():
    big = torch.tensor([100.0])
    assert nonsaturating_d_loss(big, -big).loss < 1e-30
    torch.testing.assert_close(nonsaturating_d_loss(-big, big).loss, torch.tensor(200.0))
    torch.testing.assert_close(nonsaturating_g_loss(-big), torch.tensor(100.0))
    assert nonsaturating_d_loss(big, -big).real_accuracy == 1


def test_hinge_values():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    out = hinge_d_loss(real, fake)
    torch.testing.assert_close(out.loss, torch.tensor((0 + 0.5 + 2) / 3 + (0 + 1 + 2) / 3))
    torch.testing.assert_close(hinge_g_loss(fake), torch.tensor(1.0 / 3 * -(-2.0 + 0.0 + 1.0)))
    torch.testing.assert_close(out.real_accuracy, torch.tensor(2 / 3))
    torch.testing.assert_close(out.fake_accuracy, torch.tensor(1 / 3))


def test_accuracies_are_detached_and_loss_has_gradient():
    real = torch.tensor([1.0, -1.0, 2.0, 3.0], requires_grad=True)
    fake = torch.tensor([-1.0, -2.0, 3.0, 0.5], requires_grad=True)
    out = nonsaturating_d_loss(real, fake)
    assert out.real_accuracy == 0.75 and out.fake_accuracy == 0.5
    assert not out.real_accuracy.requires_grad
    out.loss.backward()
    # d/dr softplus(−r)/n = −sigmoid(−r)/n ; d/df softplus(f)/n = sigmoid(f)/n
    torch.testing.assert_close(real.grad, -torch.sigmoid(-real.detach()) / 4)
    torch.testing.assert_close(fake.grad, torch.sigmoid(fake.detach()) / 4)


def test_r1_of_a_linear_logit_is_the_squared_weight_norm():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 3, generator=g, requires_grad=True)
    x = torch.randn(5, 4, 3, 3, generator=g, requires_grad=True)
    logits = (x * w).flatten(1).sum(1)
    penalty = r1_penalty(logits, x)
    torch.testing.assert_close(penalty, w.detach().pow(2).sum())
    penalty.backward()  # create_graph: the penalty trains the discriminator
    torch.testing.assert_close(w.grad, 2 * w.detach())


def test_r1_of_a_quadratic_logit_and_several_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 4, generator=g, requires_grad=True)
    y = torch.randn(3, 5, generator=g, requires_grad=True)
    logits = x.pow(2).flatten(1).sum(1) + 3 * y.sum(1)  # ∂/∂x = 2x, ∂/∂y = 3
    expected = (2 * x.detach()).pow(2).flatten(1).sum(1).mean() + 9 * 5
    torch.testing.assert_close(r1_penalty(logits, [x, y]), expected)


def test_r1_is_zero_for_a_logit_independent_of_the_input():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(3, requires_grad=True)
    assert r1_penalty(w * 2.0, x) == 0  # depends on a parameter, not on x
    assert r1_penalty(torch.ones(3), x) == 0  # a constant
    assert r1_penalty(x.sum(1), x) > 0
