"""One optimizer step of each phase kind (METHOD.md §2–3), given built models and a batch.

The loop owns order, data, checkpoints and logging; this file owns what happens inside a
step: drawing (t, t'), the teacher target, the student move, the losses, and the alternating
discriminator / student updates. Randomness comes only from the `generator` passed in, which
the loop seeds from (seed, rank, step), so a resumed run draws exactly what it would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from torch import Tensor

from discriminator.model import Discriminator, EncoderFeatures
from discriminator.renoise import renoise
from distill.conditioning import Conditioning
from distill.losses import gan_loss, mse_loss, r1_penalty, x0_conversion_loss
from distill.phases import PhasePlan
from distill.schedule import NoiseSchedule, next_timestep, trailing_grid, training_input
from train.build import PhaseModels
from train.config import DiscriminatorConfig
from train.stop import StopRequest


@dataclass(frozen=True)
class TrainingPoint:
    """Where one batch enters the student: x_t at t, to be moved to t' (METHOD.md §2 steps 1–2)."""

    x0: Tensor
    x_t: Tensor
    t: Tensor
    t_next: Tensor


def draw_point(plan: PhasePlan, schedule: NoiseSchedule, x0: Tensor, generator: torch.Generator) -> TrainingPoint:
    """t uniform over the phase's training timesteps, t' the next point of the student's grid."""
    batch = x0.shape[0]
    choices = torch.tensor(plan.train_timesteps, dtype=torch.long)
    t = choices[torch.randint(len(choices), (batch,), generator=generator)]
    grid = trailing_grid(plan.student_steps, schedule.num_train_timesteps)
    t_next = torch.tensor([next_timestep(grid, int(s)) for s in t], dtype=torch.long)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    t, t_next = t.to(x0.device), t_next.to(x0.device)
    return TrainingPoint(x0, training_input(schedule, x0, eps, t), t, t_next)


@dataclass
class StepOutcome:
    """What a step did, for logging and the non-finite guard.

    `values` holds 0-dim tensors as the step left them: reading `metrics` turns them into
    floats, a host synchronisation the loop pays only on the steps it logs."""

    values: dict[str, Tensor | float] = field(default_factory=dict)
    ok: bool = True  # False: the student update was skipped (non-finite loss or gradient)

    @property
    def metrics(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.values.items()}


class Updater:
    """Backward + clip + optimizer step, skipping non-finite updates (pitfall 10).

    The finite check is reduced over processes so every rank skips together. It is the step's
    one host synchronisation: whether to call `optimizer.step()` must be known on the host.
    The same reduction carries this rank's stop request (train/stop.py), so after a step
    `stop_agreed` says, identically on every rank, whether any rank was asked to stop.
    """

    def __init__(self, accelerator: Accelerator, max_grad_norm: float, stop: StopRequest | None = None):
        self.accelerator = accelerator
        self.max_grad_norm = max_grad_norm
        self.stop = stop
        self.stop_agreed = False  # as of the latest update, on every rank alike

    def __call__(self, loss: Tensor, optimizer, params, retain_graph: bool = False) -> tuple[bool, Tensor]:
        acc = self.accelerator
        finite = torch.isfinite(loss.detach()).all()
        # Backward even on a non-finite loss: under DDP every rank must join the gradient
        # all-reduce, or the ranks whose loss was finite wait forever. The step is skipped below.
        acc.backward(loss, retain_graph=retain_graph)
        if acc.sync_gradients:
            if self.max_grad_norm > 0:
                norm = torch.as_tensor(acc.clip_grad_norm_(params, self.max_grad_norm))
            else:
                grads = [p.grad.detach().norm() for p in params if p.grad is not None]
                norm = torch.stack(grads).norm() if grads else torch.zeros(())
            norm = torch.where(finite.to(norm.device), norm.detach().float(), math.nan)
            finite = finite & torch.isfinite(norm).to(finite.device)
        else:
            norm = torch.zeros(())
        stop = float(self.stop is not None and self.stop.requested)
        votes = torch.stack([finite.float().to(acc.device), torch.tensor(stop, device=acc.device)])
        finite_ranks, stopping_ranks = acc.reduce(votes, reduction="sum").tolist()
        ok = finite_ranks >= acc.num_processes
        self.stop_agreed = stopping_ranks > 0
        if ok:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return ok, norm


@dataclass(frozen=True)
class StepContext:
    """What one step needs besides the phase's models and its batch."""

    accelerator: Accelerator
    update: Updater
    d_cfg: DiscriminatorConfig
    step: int  # optimizer steps done in the phase (re-noising weights switch on it)
    generator: torch.Generator  # seeded by (seed, rank, global step): all of the step's draws
    poison: bool  # runtime.fault_nonfinite_steps: make this step's loss NaN (tests the guard)


def train_step(plan: PhasePlan, models: PhaseModels, point: TrainingPoint, cond: Conditioning,
               ctx: StepContext) -> StepOutcome:
    """One optimizer step of the phase's kind (a merge phase trains nothing)."""
    if plan.kind == "mse":
        return mse_step(plan, models, point, cond, ctx)
    if plan.kind == "x0_convert":
        return x0_convert_step(plan, models, point, cond, ctx)
    if plan.adversarial:
        return adversarial_step(plan, models, point, cond, ctx)
    raise ValueError(f"phase kind {plan.kind!r} has no training step")


def _poisoned(loss: Tensor, ctx: StepContext) -> Tensor:
    return loss * math.nan if ctx.poison else loss


def mse_step(plan: PhasePlan, models: PhaseModels, point: TrainingPoint, cond: Conditioning,
             ctx: StepContext) -> StepOutcome:
    """METHOD.md §3 "mse": L = mean ||x_hat − x_target||²."""
    with ctx.accelerator.autocast():
        target = models.teacher.target(point.x_t, point.t, point.t_next, cond, plan.teacher.steps)
        x_hat = models.student.step(models.schedule, point.x_t, point.t, point.t_next, cond).x_hat
        loss = mse_loss(x_hat, target)
    loss = _poisoned(loss, ctx)
    ok, norm = ctx.update(loss, models.optimizer_g, models.params_g)
    return StepOutcome({"loss_mse": loss.detach(), "grad_norm": norm}, ok)


def x0_convert_step(plan: PhasePlan, models: PhaseModels, point: TrainingPoint, cond: Conditioning,
                    ctx: StepContext) -> StepOutcome:
    """METHOD.md §3 "x0_convert": the student learns x0(x_t, eps_frozen, t) directly."""
    with ctx.accelerator.autocast():
        loss = x0_conversion_loss(models.student, models.teacher, point.x_t, point.t, cond)
    loss = _poisoned(loss, ctx)
    ok, norm = ctx.update(loss, models.optimizer_g, models.params_g)
    return StepOutcome({"loss_x0": loss.detach(), "grad_norm": norm}, ok)


@dataclass(frozen=True)
class Judged:
    """The discriminator's inputs for one step: real and fake samples at timesteps t_judged."""

    real: Tensor
    fake: Tensor  # carries the graph back to the student
    t: Tensor


def judged_samples(plan: PhasePlan, models: PhaseModels, point: TrainingPoint, cond: Conditioning,
                   ctx: StepContext) -> tuple[Judged, Tensor, Tensor]:
    """Real = the teacher's x_target, fake = the student's x_hat (METHOD.md §3); dataset
    images never play "real". With re-noising (1- and 2-step stages), both are taken as x0
    estimates — the x0 of the (x0, eps) pair that produced each end point — and noised to
    one shared t* with one shared noise, weights switching after `renoise_switch_step`."""
    d_cfg = ctx.d_cfg
    with ctx.accelerator.autocast():
        walk = models.teacher.walk(point.x_t, point.t, point.t_next, cond, plan.teacher.steps)
        moved = models.student.step(models.schedule, point.x_t, point.t, point.t_next, cond)
    if not plan.renoise:
        return Judged(walk.x, moved.x_hat, point.t_next), moved.x_hat, walk.x
    weights = d_cfg.renoise_weights if ctx.step < d_cfg.renoise_switch_step else d_cfg.renoise_late_weights
    noised = renoise(models.schedule, walk.x0.to(moved.pred.x0.dtype), moved.pred.x0,
                     d_cfg.renoise_timesteps, weights, ctx.generator)
    return Judged(noised.real, noised.fake, noised.t), moved.x_hat, walk.x


def adversarial_step(plan: PhasePlan, models: PhaseModels, point: TrainingPoint, cond: Conditioning,
                     ctx: StepContext) -> StepOutcome:
    """Alternating D then G updates (default 1:1), METHOD.md §3.

    D step: the DDP-wrapped discriminator on [real; fake.detach()] in ONE forward.
    G step: the unwrapped discriminator with its parameters frozen (pitfall 6: no DDP
    "marked ready twice", no gradients into D), gradients flowing through it to the student.
    """
    accelerator, d_cfg, losses = ctx.accelerator, ctx.d_cfg, gan_loss(ctx.d_cfg.loss)
    discriminator = models.discriminator
    d_raw: Discriminator = accelerator.unwrap_model(discriminator)
    judged, x_hat, x_target = judged_samples(plan, models, point, cond, ctx)
    context = None
    trains_context = plan.conditional and d_cfg.backbone_trainable
    if plan.conditional and not trains_context:
        # x_t's features are the same for real and fake: computed once per step. Without a
        # trainable backbone they do not change in the D update either, so G reuses them.
        with torch.no_grad(), accelerator.autocast():
            context = d_raw.encode(point.x_t, point.t, cond)
    metrics: dict[str, Tensor | float] = {}
    real = judged.real.detach()
    for _ in range(d_cfg.d_steps_per_g_step):
        with accelerator.autocast():
            if trains_context:
                # A trainable backbone learns from both of its inputs in the D step: x_t's
                # features with gradient too (under no_grad it learned only from x_t').
                context = d_raw.encode(point.x_t, point.t, cond)
            both = torch.cat([real, judged.fake.detach()])
            if d_cfg.r1_weight > 0:
                both.requires_grad_(True)
            logits = discriminator(both, torch.cat([judged.t, judged.t]), cond.cat(cond),
                                   _twice(context))
            real_logits, fake_logits = logits.float().chunk(2)
            d_loss = losses.d_loss(real_logits, fake_logits)
            loss_d = d_loss.loss
            if d_cfg.r1_weight > 0:
                loss_d = loss_d + d_cfg.r1_weight / 2 * r1_penalty(real_logits, both)
        ok_d, _ = ctx.update(loss_d, models.optimizer_d, models.params_d)
        metrics.update(loss_d=loss_d.detach(), d_acc_real=d_loss.real_accuracy,
                       d_acc_fake=d_loss.fake_accuracy, d_ok=float(ok_d))
    if trains_context:  # the D update changed the backbone: G sees x_t's current features
        with torch.no_grad(), accelerator.autocast():
            context = d_raw.encode(point.x_t, point.t, cond)
    d_raw.requires_grad_(False)
    try:
        with accelerator.autocast():
            fake_logits = d_raw(judged.fake, judged.t, cond, context).float()
            loss_g = losses.g_loss(fake_logits)
            if d_cfg.mse_weight > 0:  # optional MSE mixed in (METHOD.md §3; paper: 0)
                loss_g = loss_g + d_cfg.mse_weight * mse_loss(x_hat, x_target)
        loss_g = _poisoned(loss_g, ctx)
        ok, norm = ctx.update(loss_g, models.optimizer_g, models.params_g)
    finally:
        d_raw.requires_grad_(True)
    metrics.update(loss_g=loss_g.detach(), grad_norm=norm)
    return StepOutcome(metrics, ok)


def _twice(context: EncoderFeatures | None) -> EncoderFeatures | None:
    if context is None:
        return None
    return EncoderFeatures([torch.cat([d, d]) for d in context.down], torch.cat([context.mid, context.mid]))
