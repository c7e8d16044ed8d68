"""Tests of distill/student.py and distill/lora.py's live adapter: the LCM-LoRA target set at SDXL size (meta device), LoRA
init / merge / state round trips on the tiny UNet, and the student's move and x0 losses."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from distill.lora import (
    add_lora,
    has_lora,
    load_lora_state_dict,
    lora_settings,
    lora_state_dict,
    lora_target_modules,
    merge_lora,
)
from distill.losses import mse_loss, x0_conversion_loss
from distill.schedule import CLEAN, NoiseSchedule, eps_to_x0
from distill.student import Student, switch_to_x0, trainable_parameters
from distill.teacher import Teacher
from distill.testing import random_conditioning, sdxl_unet_on_meta, tiny_unet

# The module-name suffixes of diffusers' LCM-LoRA SDXL script (train_lcm_distill_lora_sdxl.py),
# an enumeration independent of the one in distill/lora.py.
LCM_LORA_SUFFIXES = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                     "ff.net.2", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
                     "upsamplers.0.conv", "time_emb_proj")
SDXL_SCALED_LINEAR = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                      "beta_schedule": "scaled_linear"}


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_scheduler_config(SDXL_SCALED_LINEAR)


def _unet_out(unet, x, t, cond):
    with torch.no_grad():
        return unet(x, t, **cond.unet_kwargs()).sample


def _inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, 8, 8, generator=g), random_conditioning(batch, seed=seed)


def _randomise_lora(unet, seed: int = 0, std: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


# --------------------------------------------------------------------------- SDXL size (meta)


def test_sdxl_target_set_is_lcm_lora_set():
    unet = sdxl_unet_on_meta()
    convs_and_linears = {n for n, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    excluded = {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2",
                "add_embedding.linear_1", "add_embedding.linear_2"}
    targets = lora_target_modules(unet)
    assert len(targets) == len(set(targets))
    assert set(targets) == convs_and_linears - excluded
    assert excluded <= convs_and_linears
    # The same set, reached from LCM-LoRA's published suffix list.
    by_suffix = {n for n in convs_and_linears if n.endswith(LCM_LORA_SUFFIXES)}
    assert set(targets) == by_suffix


def test_sdxl_rank64_trainable_count():
    unet = sdxl_unet_on_meta()
    modules = dict(unet.named_modules())
    rank = 64
    expected = 0
    targets = lora_target_modules(unet)
    for name in targets:
        m = modules[name]
        if isinstance(m, nn.Linear):  # A: in→r, B: r→out, no biases
            expected += rank * (m.in_features + m.out_features)
        else:  # A: Conv(in→r, k×k), B: 1×1 Conv(r→out)
            kh, kw = m.kernel_size
            assert m.groups == 1
            expected += rank * (m.in_channels * kh * kw + m.out_channels)
    base_count = sum(p.numel() for p in unet.parameters())
    add_lora(unet, rank=rank, alpha=rank)
    trainable = sum(p.numel() for p in trainable_parameters(unet))
    print(f"\nSDXL UNet rank-64 LoRA: {trainable:,} trainable parameters "
          f"(base {base_count:,} frozen)")
    assert trainable == expected
    frozen = sum(p.numel() for p in unet.parameters() if not p.requires_grad)
    assert frozen == base_count
    assert lora_settings(unet).rank == rank
    assert set(lora_settings(unet).target_modules) == set(targets)


# --------------------------------------------------------------------------- tiny UNet: LoRA


def test_lora_at_init_leaves_outputs_unchanged():
    base, student = tiny_unet(0), tiny_unet(0)
    add_lora(student, rank=4, alpha=8)
    x, cond = _inputs()
    t = torch.tensor([999, 249])
    assert torch.equal(_unet_out(student, x, t, cond), _unet_out(base, x, t, cond))


def test_only_lora_params_train_and_disable_gives_base():
    base, unet = tiny_unet(0), tiny_unet(0)
    add_lora(unet, rank=4, alpha=8)
    assert has_lora(unet) and not has_lora(base)
    for name, p in unet.named_parameters():
        assert p.requires_grad == ("lora_A" in name or "lora_B" in name), name
    _randomise_lora(unet)
    x, cond = _inputs()
    t = torch.tensor([500, 10])
    assert not torch.allclose(_unet_out(unet, x, t, cond), _unet_out(base, x, t, cond), atol=1e-4)
    unet.disable_adapters()  # the teacher's mechanism: the LoRA's base without a copy
    assert torch.equal(_unet_out(unet, x, t, cond), _unet_out(base, x, t, cond))
    unet.enable_adapters()
    assert not torch.allclose(_unet_out(unet, x, t, cond), _unet_out(base, x, t, cond), atol=1e-4)


def test_lora_is_float32_over_bf16_base():
    unet = tiny_unet(0).to(torch.bfloat16)
    add_lora(unet, rank=4, alpha=4)
    assert {p.dtype for p in trainable_parameters(unet)} == {torch.float32}
    assert {p.dtype for p in unet.parameters() if not p.requires_grad} == {torch.bfloat16}
    _randomise_lora(unet)
    x, cond = _inputs()
    out = _unet_out(unet, x.bfloat16(), torch.tensor([999, 10]), cond.to(dtype=torch.bfloat16))
    assert torch.isfinite(out).all()
    merge_lora(unet)
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}


def test_merge_lora_equals_adapter_and_has_plain_keys():
    rank, alpha = 4, 16.0  # alpha != rank: the scale alpha/rank = 4 must be folded in
    unet = tiny_unet(0)
    add_lora(unet, rank=rank, alpha=alpha)
    _randomise_lora(unet)
    x, cond = _inputs()
    t = torch.tensor([999, 300])
    with_adapter = _unet_out(unet, x, t, cond)
    # The scale matters: halving alpha changes the output.
    unet_half = tiny_unet(0)
    add_lora(unet_half, rank=rank, alpha=alpha / 2)
    load_lora_state_dict(unet_half, lora_state_dict(unet))
    assert not torch.allclose(_unet_out(unet_half, x, t, cond), with_adapter, atol=1e-4)

    merged = merge_lora(unet)
    assert merged is unet and not has_lora(merged)
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(_unet_out(merged, x, t, cond), with_adapter, atol=1e-5, rtol=0)
    fresh = tiny_unet(1)
    assert list(merged.state_dict()) == list(fresh.state_dict())
    assert all(p.requires_grad for p in merged.parameters())
    # The user path of METHOD.md §6: from_config + load_state_dict(strict) reproduces it.
    fresh.load_state_dict(merged.state_dict())
    torch.testing.assert_close(_unet_out(fresh, x, t, cond), with_adapter, atol=1e-5, rtol=0)


def test_lora_state_dict_round_trip():
    unet = tiny_unet(0)
    add_lora(unet, rank=2, alpha=3)
    _randomise_lora(unet, seed=3)
    state = lora_state_dict(unet)
    targets = lora_target_modules(tiny_unet(0))
    assert set(state) == {f"{n}.lora_{ab}.weight" for n in targets for ab in "AB"}
    assert lora_settings(unet).rank == 2 and lora_settings(unet).alpha == 3.0
    assert set(lora_settings(unet).target_modules) == set(targets)
    other = tiny_unet(0)
    add_lora(other, rank=2, alpha=3)
    load_lora_state_dict(other, state)
    x, cond = _inputs()
    t = torch.tensor([749, 499])
    assert torch.equal(_unet_out(other, x, t, cond), _unet_out(unet, x, t, cond))
    with pytest.raises(ValueError):
        lora_target_modules(unet)  # targets are enumerated on the plain UNet only


# --------------------------------------------------------------------------- the student


def _abar(schedule, t):
    return torch.where(torch.as_tensor(t) < 0, torch.ones(()),
                       schedule.alphas_cumprod[torch.as_tensor(t).clamp(min=0)].float()
                       ).reshape(-1, 1, 1, 1)


def test_eps_student_step_is_ddim(schedule):
    student = Student(tiny_unet(0))
    x_t, cond = _inputs()
    t, t_next = torch.tensor([999, 499]), torch.tensor([749, 249])
    with torch.no_grad():
        step = student.step(schedule, x_t, t, t_next, cond)
    eps = _unet_out(student.unet, x_t, t, cond)
    a, a_next = _abar(schedule, t), _abar(schedule, t_next)
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    torch.testing.assert_close(step.pred.eps, eps)
    torch.testing.assert_close(step.x_hat, a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps,
                               atol=1e-4, rtol=1e-4)


def test_x0_student_step_moves_its_x0(schedule):
    student = switch_to_x0(Student(tiny_unet(0)))
    assert student.prediction_type == "sample"
    with pytest.raises(ValueError):
        switch_to_x0(student)
    x_t, cond = _inputs(seed=1)
    t, t_next = torch.tensor([999, 749]), torch.tensor([499, 249])
    with torch.no_grad():
        step = student.step(schedule, x_t, t, t_next, cond)
    x0 = _unet_out(student.unet, x_t, t, cond)  # raw output read as the clean sample
    a, a_next = _abar(schedule, t), _abar(schedule, t_next)
    eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    torch.testing.assert_close(step.pred.x0, x0)
    torch.testing.assert_close(step.x_hat, a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_step_to_clean_returns_x0(schedule, prediction_type):
    student = Student(tiny_unet(2), prediction_type)
    x_t, cond = _inputs(seed=2)
    t = torch.tensor([249, 999])
    with torch.no_grad():
        step = student.step(schedule, x_t, t, torch.full((2,), CLEAN), cond)
    torch.testing.assert_close(step.x_hat, step.pred.x0, atol=1e-5, rtol=1e-5)


class _X0Rewrite(nn.Module):
    """An exact x0 rewrite of an epsilon UNet: x0(x_t, eps(x_t), t), same call signature."""

    def __init__(self, eps_unet: nn.Module, schedule: NoiseSchedule):
        super().__init__()
        self.eps_unet, self.schedule = eps_unet, schedule

    def forward(self, sample, timestep, **kwargs):
        eps = self.eps_unet(sample, timestep, **kwargs).sample
        return UNet2DConditionOutput(sample=eps_to_x0(self.schedule, sample, eps, timestep))


def test_x0_conversion_loss(schedule):
    frozen = tiny_unet(0).requires_grad_(False)
    x_t, cond = _inputs(seed=4)
    t = torch.tensor([999, 249])

    exact = switch_to_x0(Student(_X0Rewrite(copy.deepcopy(frozen).requires_grad_(True), schedule)))
    assert x0_conversion_loss(exact, Teacher(frozen, schedule), x_t, t, cond).item() < 1e-10

    student = switch_to_x0(Student(tiny_unet(0)))  # eps weights, x0 reading: not converted yet
    loss = x0_conversion_loss(student, Teacher(frozen, schedule), x_t, t, cond)
    assert loss.item() > 1e-2
    loss.backward()
    assert all(p.grad is not None for p in student.unet.parameters() if p.requires_grad)
    assert any(p.grad.abs().sum() > 0 for p in student.unet.parameters())
    assert all(p.grad is None for p in frozen.parameters())
    # Even a trainable frozen copy receives nothing: eps_ref is computed under no_grad.
    frozen.requires_grad_(True)
    x0_conversion_loss(student, Teacher(frozen, schedule), x_t, t, cond).backward()
    assert all(p.grad is None for p in frozen.parameters())
    with pytest.raises(ValueError):
        x0_conversion_loss(Student(tiny_unet(0)), Teacher(frozen, schedule), x_t, t, cond)


def test_mse_loss_closed_form():
    x_hat = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x_target = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert mse_loss(x_hat, x_target).item() == pytest.approx((4 + 9) / 4)
    assert mse_loss(x_hat.bfloat16(), x_target.bfloat16()).dtype == torch.float32
