"""Every loss of the recipe, in one place (METHOD.md §3).

- mse: L = mean ||x_hat − x_target||² (progressive distillation, stage 0 and the MSE baseline).
- x0 conversion: L = mean ||f_student(x_t) − x0(x_t, eps_ref, t)||² (before the 1-step stage).
- GAN losses on discriminator logits, chosen by name (`gan_loss("nonsaturating" | "hinge")`).
  Non-saturating losses use softplus on logits, which is −log σ(·) computed stably:
      L_D = softplus(−D(real)) + softplus(D(fake)),   L_G = softplus(−D(fake))   (batch means).
  Hinge is the usual alternative; R1 penalises the discriminator's gradient on real inputs.
All functions are pure: tensors in, scalar tensors out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.conditioning import Conditioning
from distill.student import Student, unet_output
from distill.teacher import Teacher

# --------------------------------------------------------------------------- distillation



def mse_loss(x_hat: Tensor, x_target: Tensor) -> Tensor:
    """L = mean ||x_hat − x_target||² (METHOD.md §3 "mse"), reduced in float32 under autocast."""
    return (x_hat.float() - x_target.float()).square().mean()


def x0_conversion_loss(student: Student, reference: Teacher, x_t: Tensor, t: Tensor,
                       cond: Conditioning) -> Tensor:
    """L = mean ||f_student(x_t, t, c) − x0(x_t, eps_ref, t)||² (METHOD.md §3 x0_convert).

    eps_ref comes from the frozen epsilon model, `reference` (the phase's teacher), without
    gradients: the student learns to output directly the clean sample the epsilon model
    implies, so the 1-step stage starts from an x0 model that agrees with its epsilon
    ancestor. Going through `Teacher.predict` matters for a LoRA student: its teacher is the
    student's own UNet with the adapter disabled, and calling that UNet directly would read
    the live adapter as the "frozen" reference.
    """
    if student.prediction_type != "sample":
        raise ValueError("x0 conversion trains an x0 student: call switch_to_x0 first")
    x0_ref = reference.predict(x_t, t, cond).x0  # no_grad inside
    return mse_loss(unet_output(student.unet, x_t, t, cond), x0_ref)


# --------------------------------------------------------------------------- adversarial


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


@dataclass(frozen=True)
class GanLoss:
    """A discriminator loss and the student's loss that goes with it."""

    d_loss: Callable[[Tensor, Tensor], DiscriminatorLoss]
    g_loss: Callable[[Tensor], Tensor]


GAN_LOSSES = {
    "nonsaturating": GanLoss(nonsaturating_d_loss, nonsaturating_g_loss),
    "hinge": GanLoss(hinge_d_loss, hinge_g_loss),
}


def gan_loss(name: str) -> GanLoss:
    """The GAN loss pair called `name` (config `discriminator.loss`)."""
    if name not in GAN_LOSSES:
        raise ValueError(f"unknown GAN loss {name!r}; known: {sorted(GAN_LOSSES)}")
    return GAN_LOSSES[name]
