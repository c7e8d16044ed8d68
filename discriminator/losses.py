"""GAN losses on discriminator logits (METHOD.md §3) and an R1 penalty.

Non-saturating losses use softplus on logits, which is −log σ(·) computed stably:
    L_D = softplus(−D(real)) + softplus(D(fake)),   L_G = softplus(−D(fake))   (means over batch).
Hinge variants are the usual alternative; R1 penalises the discriminator's gradient on real
inputs. All functions are pure: logits in, scalar tensors out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class DiscriminatorLoss:
    """The D loss to backpropagate, and for logging the fraction of real logits > 0 and of
    fake logits < 0 (detached)."""

    loss: Tensor
    real_accuracy: Tensor
    fake_accuracy: Tensor


def _accuracy(real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Tensor]:
    return ((real_logits.detach() > 0).float().mean(), (fake_logits.detach() < 0).float().mean())


def nonsaturating_d_loss(real_logits: Tensor, fake_logits: Tensor) -> DiscriminatorLoss:
    """mean softplus(−D(real)) + mean softplus(D(fake)); 2·log 2 at logits 0."""
    loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    return DiscriminatorLoss(loss, *_accuracy(real_logits, fake_logits))


def nonsaturating_g_loss(fake_logits: Tensor) -> Tensor:
    """mean softplus(−D(fake)): the student's non-saturating loss."""
    return F.softplus(-fake_logits).mean()


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> DiscriminatorLoss:
    """mean relu(1 − D(real)) + mean relu(1 + D(fake))."""
    loss = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
    return DiscriminatorLoss(loss, *_accuracy(real_logits, fake_logits))


def hinge_g_loss(fake_logits: Tensor) -> Tensor:
    """−mean D(fake)."""
    return -fake_logits.mean()


def r1_penalty(real_logits: Tensor, real_inputs: Tensor | Sequence[Tensor]) -> Tensor:
    """mean over the batch of ||∂ D(real) / ∂ real_inputs||² (summed over all inputs).

    `real_inputs` must have requires_grad and have produced `real_logits`; the graph is kept
    (create_graph) so the penalty itself trains the discriminator. Inputs the logits do not
    depend on contribute zero. Scale by γ/2 at the call site.
    """
    inputs = [real_inputs] if isinstance(real_inputs, Tensor) else list(real_inputs)
    if not real_logits.requires_grad:  # a constant logit: its gradient is zero everywhere
        return real_logits.new_zeros(())
    grads = torch.autograd.grad(real_logits.sum(), inputs, create_graph=True, allow_unused=True)
    penalty = real_logits.new_zeros(real_logits.shape[0])
    for g in grads:
        if g is not None:
            penalty = penalty + g.pow(2).flatten(1).sum(1)
    return penalty.mean()
