"""train/steps.py on a tiny random SDXL-style UNet, one process: each phase kind's step
updates what it should, reports finite losses, and a poisoned step changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator

from discriminator.model import Discriminator
from distill.lora import add_lora
from distill.losses import gan_loss, x0_conversion_loss
from distill.phases import PhaseConfig, StageConfig, expand_recipe
from distill.schedule import SDXL_SCHEDULER_CONFIG, NoiseSchedule
from distill.student import Student, switch_to_x0, trainable_parameters
from distill.teacher import Teacher
from distill.testing import random_conditioning, tiny_unet
from train.build import LearningRates, PhaseModels
from train.config import DiscriminatorConfig
from train.steps import StepContext, Updater, adversarial_step, draw_point, train_step

SCHEDULE = NoiseSchedule.from_scheduler_config(SDXL_SCHEDULER_CONFIG)
D_CFG = DiscriminatorConfig(bucket_edges=[100, 400, 700], renoise_switch_step=1)


def _plan(kind: str, form: str = "full", student_steps: int = 2):
    phases = [PhaseConfig(kind=kind, steps=2, form=form)]
    if kind == "x0_convert":
        student_steps = 1
    stage = StageConfig(teacher_steps=2 * student_steps, student_steps=student_steps, phases=phases)
    return expand_recipe([stage])[0]


def _models(plan, accelerator: Accelerator, lora: bool = False) -> PhaseModels:
    base = tiny_unet(seed=0).requires_grad_(False).eval()
    unet = copy.deepcopy(base)
    if lora:
        add_lora(unet, rank=4, alpha=4.0)
        torch.nn.init.normal_(next(p for n, p in unet.named_parameters() if "lora_B" in n), std=0.1)
    else:
        unet.requires_grad_(True)
    student = Student(unet.train())
    if plan.prediction_type == "sample":
        student = switch_to_x0(student)
    params_g = trainable_parameters(unet)
    models = PhaseModels(student, Teacher(base, SCHEDULE), SCHEDULE,
                         torch.optim.AdamW(params_g, lr=1e-3, betas=(0.0, 0.99)), params_g,
                         LearningRates(1e-3, 1e-3))
    if plan.adversarial:
        torch.manual_seed(1)
        disc = Discriminator(base, conditional=plan.conditional, bucket_edges=D_CFG.bucket_edges,
                             multiscale=True, backbone_trainable=False, head_channels=None,
                             share_weights=True)
        models.discriminator, models.params_d = disc, disc.trainable_parameters()
        models.optimizer_d = torch.optim.AdamW(models.params_d, lr=1e-3, betas=(0.0, 0.99))
    return models


def _step(plan, models, accelerator, poison=False, step=0):
    g = torch.Generator().manual_seed(step)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    point = draw_point(plan, SCHEDULE, x0, g)
    ctx = StepContext(accelerator, Updater(accelerator, 1.0), D_CFG, step, g, poison)
    return train_step(plan, models, point, random_conditioning(4, seed=step), ctx)


def _snapshot(params):
    return [p.detach().clone() for p in params]


def _changed(before, params) -> bool:
    return any(not torch.equal(b, p.detach()) for b, p in zip(before, params))


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


@pytest.mark.parametrize("kind, form, loss_key", [
    ("mse", "full", "loss_mse"),
    ("x0_convert", "full", "loss_x0"),
    ("adv_conditional", "lora", "loss_g"),
    ("adv_unconditional", "full", "loss_g"),
])
def test_a_step_updates_the_student_and_reports_finite_losses(accelerator, kind, form, loss_key):
    plan = _plan(kind, form)
    models = _models(plan, accelerator, lora=form == "lora")
    before_g = _snapshot(models.params_g)
    before_d = _snapshot(models.params_d or [])
    outcome = _step(plan, models, accelerator)
    assert outcome.ok
    assert torch.isfinite(torch.tensor(outcome.metrics[loss_key]))
    assert outcome.metrics["grad_norm"] > 0
    assert _changed(before_g, models.params_g)
    if plan.adversarial:  # the D step ran first and moved the heads; G left D as it found it
        assert outcome.metrics["d_ok"] == 1.0
        assert 0.0 <= outcome.metrics["d_acc_real"] <= 1.0
        assert _changed(before_d, models.params_d)
        assert all(p.requires_grad for p in models.params_d)


@pytest.mark.parametrize("kind", ["mse", "adv_unconditional"])
def test_a_poisoned_step_is_skipped_and_changes_no_student_weight(accelerator, kind):
    plan = _plan(kind)
    models = _models(plan, accelerator)
    before = _snapshot(models.params_g)
    outcome = _step(plan, models, accelerator, poison=True)
    assert not outcome.ok
    assert not _changed(before, models.params_g)
    assert all(p.grad is None for p in models.params_g)  # gradients cleared for the next step


def test_merge_has_no_training_step(accelerator):
    stage = StageConfig(teacher_steps=4, student_steps=2, phases=[
        PhaseConfig(kind="adv_conditional", steps=1, form="lora"), PhaseConfig(kind="merge", steps=0)])
    plans = expand_recipe([stage])
    models = _models(plans[0], accelerator, lora=True)
    with pytest.raises(ValueError, match="merge"):
        _step(plans[1], models, accelerator)


def test_steps_are_deterministic_given_the_generator(accelerator):
    plan = _plan("adv_conditional", "lora")
    results = []
    for _ in range(2):
        models = _models(plan, accelerator, lora=True)
        outcome = _step(plan, models, accelerator, step=3)
        results.append((outcome.metrics["loss_g"], _snapshot(models.params_g)))
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_trainable_backbone_learns_from_both_conditional_inputs(accelerator):
    """#10: with backbone_trainable, the D step's backbone gradient is the full gradient of
    L_D, x_t's features included (it was computed under no_grad: cosine 0.69 to this)."""
    plan = _plan("adv_conditional", student_steps=4)  # 4 steps: no re-noising of D inputs
    assert not plan.renoise
    d_cfg = DiscriminatorConfig(bucket_edges=[100, 400, 700], backbone_trainable=True)
    models = _models(plan, accelerator)
    torch.manual_seed(1)
    disc = Discriminator(tiny_unet(seed=0), conditional=True, bucket_edges=d_cfg.bucket_edges,
                         multiscale=True, backbone_trainable=True, head_channels=None)
    models.discriminator, models.params_d = disc, disc.trainable_parameters()
    models.optimizer_d = torch.optim.SGD(models.params_d, lr=1.0)
    before = _snapshot(models.params_d)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    point = draw_point(plan, SCHEDULE, x0, g)
    cond = random_conditioning(4, seed=0)
    # the expected gradient, by hand: L_D on [teacher target; student move] with x_t's features
    # inside the graph
    with torch.no_grad():
        real = models.teacher.target(point.x_t, point.t, point.t_next, cond, plan.teacher.steps)
        fake = models.student.step(SCHEDULE, point.x_t, point.t, point.t_next, cond).x_hat
    both_t = torch.cat([point.t_next, point.t_next])
    context = disc.encode(point.x_t, point.t, cond)
    twice = type(context)([torch.cat([d, d]) for d in context.down], torch.cat([context.mid, context.mid]))
    real_logits, fake_logits = disc(torch.cat([real, fake]), both_t, cond.cat(cond), twice).chunk(2)
    loss = gan_loss("nonsaturating").d_loss(real_logits, fake_logits).loss
    expected = torch.autograd.grad(loss, models.params_d)
    # one D step with SGD lr 1 and no clipping moves the parameters by exactly −grad
    ctx = StepContext(accelerator, Updater(accelerator, 0.0), d_cfg, 0, g, False)
    adversarial_step(plan, models, point, cond, ctx)
    backbone = {id(p) for p in disc.backbone.parameters()}
    checked = 0
    for p, b, e in zip(models.params_d, before, expected):
        if id(p) in backbone and e.abs().sum() > 0:
            torch.testing.assert_close(b - p.detach(), e, rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked > 10


def test_lora_x0_conversion_reads_the_base_not_the_live_adapter(accelerator):
    """#10: a LoRA student's teacher is its own UNet with the adapter disabled; the x0
    reference must come from the base weights, not the adapter-on student."""
    plan = _plan("x0_convert", "lora")
    models = _models(plan, accelerator, lora=True)  # lora_B ≠ 0: the adapter changes outputs
    models.teacher = Teacher(models.student.unet, SCHEDULE, disable_adapter=True)
    base = Teacher(tiny_unet(seed=0).requires_grad_(False), SCHEDULE)
    g = torch.Generator().manual_seed(0)
    point = draw_point(plan, SCHEDULE, torch.randn(4, 4, 8, 8, generator=g), g)
    cond = random_conditioning(4, seed=0)
    expected = x0_conversion_loss(models.student, base, point.x_t, point.t, cond)
    outcome = _step(plan, models, accelerator, step=0)
    assert outcome.metrics["loss_x0"] == pytest.approx(float(expected.detach()), rel=1e-5)
