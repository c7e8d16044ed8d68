"""The frozen teacher: guidance, parametrisations, the n-step target, LoRA-disabled base."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from distill.schedule import (
    CLEAN,
    SDXL_SCHEDULER_CONFIG,
    NoiseSchedule,
    eps_to_x0,
    move,
    next_timestep,
    teacher_subgrid,
    to_prediction,
    trailing_grid,
)
from distill.teacher import Teacher
from distill.testing import random_conditioning, tiny_unet

SCHEDULE = NoiseSchedule.from_scheduler_config(SDXL_SCHEDULER_CONFIG)
TOL = dict(rtol=1e-5, atol=1e-5)
# Batched against per-sample walks: the same math in another reduction order (conv and
# attention kernels pick different blockings per batch shape, and differ between Intel and AMD
# CPUs). fp32 rounding of ~1e-7 grows through the x0 = (x_t − sqrt(1−abar)·eps)/sqrt(abar)
# step (1/sqrt(abar_999) ≈ 15) and the CFG difference (scale 2): 1e-4 covers that with margin
# on outputs of order 1–10, while a wrong timestep or a mixed-up sample is off by O(1).
REDUCTION_ORDER_TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet(seed=0).eval()


def latents(batch, seed=0):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def raw(unet, x, t, cond):
    with torch.no_grad():
        return unet(x, torch.as_tensor(t).reshape(-1).expand(x.shape[0]), **cond.unet_kwargs()).sample


class ForwardCounter:
    """Records the batch size of every UNet forward."""

    def __init__(self, module):
        self.batches = []
        self.handle = module.register_forward_hook(
            lambda mod, args, kwargs, out: self.batches.append(args[0].shape[0]), with_kwargs=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_no_guidance_is_the_plain_unet(unet):
    x, cond, t = latents(3), random_conditioning(3), torch.tensor([999, 500, 10])
    out = raw(unet, x, t, cond)
    for scale in (0.0, 1.0):  # diffusers guides only when w > 1
        with ForwardCounter(unet) as calls:
            pred = Teacher(unet, SCHEDULE, guidance_scale=scale).predict(x, t, cond)
        assert calls.batches == [3]
        torch.testing.assert_close(pred.eps, out, rtol=0, atol=0)
        torch.testing.assert_close(pred.x0, eps_to_x0(SCHEDULE, x, out, t), rtol=0, atol=0)


def test_guidance_is_one_batched_forward_and_the_diffusers_formula(unet):
    x, cond, t = latents(2, seed=1), random_conditioning(2, seed=1), torch.tensor([749, 249])
    teacher = Teacher(unet, SCHEDULE, guidance_scale=6.0)
    with ForwardCounter(unet) as calls:
        pred = teacher.predict(x, t, cond)
    assert calls.batches == [4]
    uncond = raw(unet, x, t, cond.unconditional())
    text = raw(unet, x, t, cond)
    guided = uncond + 6.0 * (text - uncond)
    torch.testing.assert_close(pred.eps, guided, **TOL)
    assert not torch.allclose(guided, text, atol=1e-3)  # guidance changes the answer
    # The unconditional branch is all-zero embeddings with the same micro-conditioning.
    assert torch.count_nonzero(cond.unconditional().prompt_embeds) == 0
    assert torch.equal(cond.unconditional().time_ids, cond.time_ids)


def test_sample_prediction_teacher_is_converted_at_the_boundary(unet):
    x, cond, t = latents(2, seed=2), random_conditioning(2, seed=2), torch.tensor([499, 124])
    out = raw(unet, x, t, cond)
    pred = Teacher(unet, SCHEDULE, prediction_type="sample").predict(x, t, cond)
    torch.testing.assert_close(pred.x0, out, rtol=0, atol=0)
    ref = to_prediction(SCHEDULE, x, out, t, "sample")
    torch.testing.assert_close(pred.eps, ref.eps, rtol=0, atol=0)
    with pytest.raises(ValueError, match="prediction_type"):
        Teacher(unet, SCHEDULE, prediction_type="x0")


def test_predict_accepts_an_int_timestep(unet):
    x, cond = latents(2, seed=3), random_conditioning(2, seed=3)
    teacher = Teacher(unet, SCHEDULE)
    torch.testing.assert_close(teacher.predict(x, 499, cond).eps,
                               teacher.predict(x, torch.tensor([499, 499]), cond).eps, rtol=0, atol=0)


@pytest.mark.parametrize("guidance_scale", [0.0, 3.0])
def test_target_with_equal_steps_is_one_move(unet, guidance_scale):
    grid = trailing_grid(4)
    t = torch.tensor(grid)
    t_next = torch.tensor([next_timestep(grid, s) for s in grid])
    x, cond = latents(4, seed=4), random_conditioning(4, seed=4)
    teacher = Teacher(unet, SCHEDULE, guidance_scale=guidance_scale)
    with ForwardCounter(unet) as calls:
        target = teacher.target(x, t, t_next, cond, teacher_steps=4)
    assert len(calls.batches) == 1
    expected = move(SCHEDULE, teacher.predict(x, t, cond), t_next)
    torch.testing.assert_close(target, expected, **TOL)
    assert t_next[-1].item() == CLEAN  # the last one lands on the clean estimate
    torch.testing.assert_close(target[3], teacher.predict(x, t, cond).x0[3], **TOL)


def test_target_walks_the_finer_grid(unet):
    x, cond = latents(2, seed=5), random_conditioning(2, seed=5)
    t, t_next = torch.tensor([999, 999]), torch.tensor([749, 749])
    teacher = Teacher(unet, SCHEDULE)
    target = teacher.target(x, t, t_next, cond, teacher_steps=16)
    walk = teacher_subgrid(999, 749, 16) + [749]
    assert len(walk) == 5  # 4 teacher steps per student step
    manual = x
    for s, s_next in zip(walk[:-1], walk[1:]):
        manual = move(SCHEDULE, teacher.predict(manual, s, cond), torch.full((2,), s_next))
    torch.testing.assert_close(target, manual, **TOL)
    one_step = move(SCHEDULE, teacher.predict(x, t, cond), t_next)
    assert not torch.allclose(target, one_step, atol=1e-3)


def test_walk_reports_the_x0_of_its_last_move(unet):
    x, cond = latents(3, seed=10), random_conditioning(3, seed=10)
    t, t_next = torch.tensor([999, 749, 249]), torch.tensor([749, 499, CLEAN])
    teacher = Teacher(unet, SCHEDULE)
    walk = teacher.walk(x, t, t_next, cond, teacher_steps=8)
    torch.testing.assert_close(walk.x, teacher.target(x, t, t_next, cond, 8), rtol=0, atol=0)
    # Each sample's last move starts at 874, 624 and 124 respectively, from the walked point.
    before_last = teacher.target(x, t, torch.tensor([874, 624, 124]), cond, 8)
    last = teacher.predict(before_last, torch.tensor([874, 624, 124]), cond)
    torch.testing.assert_close(walk.x0, last.x0, **TOL)
    torch.testing.assert_close(walk.x[2], walk.x0[2], rtol=0, atol=0)  # ending clean: x = x0


def test_target_with_mixed_timesteps_equals_per_sample(unet):
    """A 1-step stage batch against a 2-step teacher: walks of different lengths, some off
    the teacher's grid (749 → 499 → clean), all in one batch."""
    t = torch.tensor([249, 999, 749, 499, 749, 249])
    t_next = torch.full_like(t, CLEAN)
    x, cond = latents(6, seed=6), random_conditioning(6, seed=6)
    teacher = Teacher(unet, SCHEDULE, guidance_scale=2.0)
    with ForwardCounter(unet) as calls:
        target = teacher.target(x, t, t_next, cond, teacher_steps=2)
    # Lockstep: one forward per teacher step of the longest walk, over the samples still walking
    # (CFG doubles the batch): 999 → 499 → clean and 749 → 499 → clean take two.
    assert calls.batches == [12, 6]
    for i in range(6):
        alone = teacher.target(x[i:i + 1], t[i:i + 1], t_next[i:i + 1], cond.index(slice(i, i + 1)),
                               teacher_steps=2)
        torch.testing.assert_close(target[i:i + 1], alone, **REDUCTION_ORDER_TOL)
    # Mixed student-grid pairs in an 8 → 4 stage.
    t, t_next = torch.tensor([749, 999, 249, 499]), torch.tensor([499, 749, CLEAN, 249])
    target = teacher.target(x[:4], t, t_next, cond.index(slice(0, 4)), teacher_steps=8)
    for i in range(4):
        alone = teacher.target(x[i:i + 1], t[i:i + 1], t_next[i:i + 1], cond.index(slice(i, i + 1)),
                               teacher_steps=8)
        torch.testing.assert_close(target[i:i + 1], alone, **REDUCTION_ORDER_TOL)


def test_target_keeps_the_input_dtype(unet):
    x, cond = latents(2, seed=7), random_conditioning(2, seed=7)
    t, t_next = torch.tensor([999, 499]), torch.tensor([499, CLEAN])
    teacher = Teacher(unet, SCHEDULE)
    ref = teacher.target(x, t, t_next, cond, teacher_steps=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = teacher.target(x, t, t_next, cond, teacher_steps=4)
    assert auto.dtype == torch.float32
    torch.testing.assert_close(auto, ref, rtol=0.1, atol=0.1)
    low = teacher.target(x.bfloat16(), t, t_next, cond, teacher_steps=4)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, rtol=0.05, atol=0.05)


def lora_unet():
    """A tiny UNet with a LoRA (PeftAdapterMixin) whose up-weights are random, so it matters."""
    unet = tiny_unet(seed=0).eval()
    base = tiny_unet(seed=0).eval()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return unet, base


def test_disabled_adapter_teacher_is_the_base_unet():
    unet, base = lora_unet()
    x, cond, t = latents(2, seed=8), random_conditioning(2, seed=8), torch.tensor([999, 499])
    with_lora = raw(unet, x, t, cond)
    base_out = raw(base, x, t, cond)
    assert not torch.allclose(with_lora, base_out, atol=1e-3)  # the LoRA changes the UNet
    teacher = Teacher(unet, SCHEDULE, disable_adapter=True)
    torch.testing.assert_close(teacher.predict(x, t, cond).eps, base_out, **TOL)
    # The student's adapter is active again after the call.
    torch.testing.assert_close(raw(unet, x, t, cond), with_lora, rtol=0, atol=0)
    t_next = torch.tensor([499, CLEAN])
    target = teacher.target(x, t, t_next, cond, teacher_steps=4)
    torch.testing.assert_close(target, Teacher(base, SCHEDULE).target(x, t, t_next, cond, 4), **TOL)
    torch.testing.assert_close(raw(unet, x, t, cond), with_lora, rtol=0, atol=0)
    # Without the flag the same wrapper sees the LoRA.
    torch.testing.assert_close(Teacher(unet, SCHEDULE).predict(x, t, cond).eps, with_lora,
                               rtol=0, atol=0)


def test_adapter_is_enabled_again_when_the_forward_fails():
    unet, _ = lora_unet()
    x, cond, t = latents(2, seed=9), random_conditioning(2, seed=9), torch.tensor([999, 499])
    with_lora = raw(unet, x, t, cond)
    bad = random_conditioning(3, seed=9)  # batch mismatch: the UNet raises
    with pytest.raises(RuntimeError):
        Teacher(unet, SCHEDULE, disable_adapter=True).predict(x, t, bad.index(slice(0, 3)))
    torch.testing.assert_close(raw(unet, x, t, cond), with_lora, rtol=0, atol=0)


def test_bf16_teacher_embeds_the_exact_micro_conditioning():
    """Pitfall 11: a bf16 teacher must see time_ids 1365 / 301, not bf16's 1368 / 300."""
    unet = tiny_unet(seed=0).to(torch.bfloat16)
    seen = []
    hook = unet.add_time_proj.register_forward_hook(lambda m, args, out: seen.append(args[0].clone()))
    cond = random_conditioning(2, seed=0)
    exact = torch.tensor([[1365.0, 1024.0, 301.0, 0.0, 1024.0, 1024.0]]).repeat(2, 1)
    cond = type(cond)(cond.prompt_embeds, cond.pooled_embeds, exact)
    assert torch.equal(cond.to(dtype=torch.bfloat16).time_ids, exact)
    for scale in (0.0, 3.0):  # the plain forward and the batched CFG forward
        Teacher(unet, SCHEDULE, guidance_scale=scale).predict(latents(2), 999, cond)
    hook.remove()
    assert len(seen) == 2
    for time_ids in seen:
        assert time_ids.dtype == torch.float32
        assert set(time_ids.flatten().tolist()) == {1365.0, 1024.0, 301.0, 0.0}
