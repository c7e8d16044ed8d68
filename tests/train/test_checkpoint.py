"""train/checkpoint.py in one process: checkpoints are published complete (temp folder, manifest,
then rename), pruned to keep_last, found newest-first ignoring staging folders, verified against
their manifest with damaged ones set aside, and restore the state."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator

from train.checkpoint import (
    COUNTERS_FILE,
    Counters,
    complete_checkpoints,
    intact_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    remove_checkpoints,
    save_checkpoint,
)


@pytest.fixture()
def trained(tmp_path):
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer, tmp_path / "stages/8step/0_mse"


def _train_one_step(model, optimizer):
    model(torch.ones(4, 3)).square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_save_publishes_a_complete_folder_and_prunes(trained):
    accelerator, model, optimizer, phase_dir = trained
    for step in (2, 4, 6):
        _train_one_step(model, optimizer)
        path = save_checkpoint(accelerator, phase_dir, Counters(3, step, 1, 2), keep_last=2)
        assert path == phase_dir / f"checkpoint-{step}"
        assert json.loads((path / COUNTERS_FILE).read_text())["step"] == step
    assert [s for s, _ in complete_checkpoints(phase_dir)] == [4, 6]
    assert not list(phase_dir.glob("*.tmp"))


def test_latest_ignores_staging_folders_and_intact_sets_unverified_ones_aside(trained):
    accelerator, model, optimizer, phase_dir = trained
    save_checkpoint(accelerator, phase_dir, Counters(0, 2, 0, 0), keep_last=3)
    (phase_dir / "checkpoint-8.tmp").mkdir()
    (phase_dir / "checkpoint-8.tmp" / COUNTERS_FILE).write_text("{}")
    assert latest_checkpoint(phase_dir) == phase_dir / "checkpoint-2"
    (phase_dir / "checkpoint-9").mkdir()  # published by hand, no manifest: not trusted
    assert latest_checkpoint(phase_dir) == phase_dir / "checkpoint-9"
    assert intact_checkpoint(phase_dir) == phase_dir / "checkpoint-2"
    assert (phase_dir / "checkpoint-9.corrupt").is_dir()  # set aside, not deleted
    assert latest_checkpoint(phase_dir) == phase_dir / "checkpoint-2"
    assert latest_checkpoint(phase_dir / "missing") is None
    assert intact_checkpoint(phase_dir / "missing") is None


@pytest.mark.parametrize("damage", ["truncate", "empty", "garble", "delete_optimizer", "garble_counters"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(trained, damage, caplog):
    accelerator, model, optimizer, phase_dir = trained
    for step in (2, 4):
        _train_one_step(model, optimizer)
        save_checkpoint(accelerator, phase_dir, Counters(0, step, 0, 0), keep_last=2)
    newest = phase_dir / "checkpoint-4"
    weights = newest / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "garble":  # same size, one byte flipped in the tensor data
        weights.write_bytes(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])
    elif damage == "delete_optimizer":
        (newest / "optimizer.bin").unlink()
    else:
        (newest / COUNTERS_FILE).write_text('{"phase": 0, "st')
    with caplog.at_level("WARNING", logger="train"):
        chosen = intact_checkpoint(phase_dir)
    assert chosen == phase_dir / "checkpoint-2"
    assert (phase_dir / "checkpoint-4.corrupt").is_dir() and not newest.exists()
    text = caplog.text
    assert "checkpoint-4 is damaged" in text and "2 step(s) to redo" in text
    assert load_checkpoint(accelerator, chosen) == Counters(0, 2, 0, 0)


def test_no_intact_checkpoint_left_restarts_the_phase(trained, caplog):
    accelerator, model, optimizer, phase_dir = trained
    save_checkpoint(accelerator, phase_dir, Counters(0, 6, 0, 0), keep_last=1)
    (phase_dir / "checkpoint-6" / "model.safetensors").write_bytes(b"\0" * 8)
    with caplog.at_level("WARNING", logger="train"):
        assert intact_checkpoint(phase_dir) is None
    assert "the phase starts over (6 step(s) to redo)" in caplog.text
    assert (phase_dir / "checkpoint-6.corrupt").is_dir()


def test_load_restores_weights_optimizer_and_counters(trained):
    accelerator, model, optimizer, phase_dir = trained
    _train_one_step(model, optimizer)
    saved = save_checkpoint(accelerator, phase_dir, Counters(1, 5, 0, 3), keep_last=1)
    weights = [p.detach().clone() for p in model.parameters()]
    _train_one_step(model, optimizer)
    assert not torch.equal(weights[0], next(model.parameters()).detach())
    counters = load_checkpoint(accelerator, saved)
    assert counters == Counters(1, 5, 0, 3)
    assert all(torch.equal(w, p.detach()) for w, p in zip(weights, model.parameters()))
    assert optimizer.state_dict()["state"][0]["step"] == 1  # Adam's state came back too


def test_remove_drops_checkpoints_and_leftovers(trained):
    accelerator, model, optimizer, phase_dir = trained
    save_checkpoint(accelerator, phase_dir, Counters(0, 2, 0, 0), keep_last=3)
    (phase_dir / "checkpoint-4.tmp").mkdir()
    (phase_dir / "final").mkdir()
    remove_checkpoints(phase_dir)
    assert sorted(p.name for p in phase_dir.iterdir()) == ["final"]


# ----------------------------------------------------------------------------- what a checkpoint holds


def _lora_student(base, seed: int):
    """A LoRA student sharing `base`'s weights, prepared with its optimizer (as build.py does)."""
    from distill.lora import add_lora
    from distill.student import trainable_parameters
    from train.models import shared_unet

    torch.manual_seed(seed)
    student = shared_unet(base)
    add_lora(student, 4, 4.0)
    params = trainable_parameters(student)
    accelerator = Accelerator(cpu=True)
    student, optimizer = accelerator.prepare(student, torch.optim.AdamW(params, lr=1e-2))
    return accelerator, student, optimizer, params


def _lora_step(student, optimizer, seed: int):
    from distill.testing import random_conditioning

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    cond = random_conditioning(2)
    student(x, torch.tensor([999, 499]), **cond.unet_kwargs()).sample.square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def test_lora_checkpoint_holds_only_the_adapter_and_resumes_bitwise(tmp_path):
    from safetensors.torch import load_file

    from distill.testing import tiny_unet
    from train.models import plain_weights

    torch.manual_seed(0)
    base = tiny_unet().requires_grad_(False)
    phase_dir = tmp_path / "stages/8step/0_adv_conditional"
    accelerator, student, optimizer, params = _lora_student(base, seed=1)
    _lora_step(student, optimizer, seed=0)
    path = save_checkpoint(accelerator, phase_dir, Counters(0, 1, 0, 0), keep_last=2, trainable=params)
    held = load_file(path / "model.safetensors")
    assert held and all("lora_" in key for key in held), [k for k in held if "lora_" not in k][:3]
    assert len(held) == len(params)
    base_bytes = sum(v.numel() * v.element_size() for v in plain_weights(student).values())
    assert (path / "model.safetensors").stat().st_size < base_bytes
    _lora_step(student, optimizer, seed=1)
    expected = [p.detach().clone() for p in params]

    # A fresh build (another LoRA initialisation) resumed from the checkpoint continues exactly.
    accelerator, student, optimizer, params = _lora_student(base, seed=2)
    assert load_checkpoint(accelerator, path, trainable=params).step == 1
    _lora_step(student, optimizer, seed=1)
    for got, want in zip(params, expected):
        assert torch.equal(got, want)


def test_checkpoint_refuses_a_base_whose_weights_changed(tmp_path):
    from safetensors.torch import save_file

    from train.checkpoint import frozen_reference
    from train.errors import UserError

    base_dir = tmp_path / "base"
    (base_dir / "unet").mkdir(parents=True)
    save_file({"w": torch.ones(3)}, str(base_dir / "unet/diffusion_pytorch_model.safetensors"))
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = list(model.parameters())
    path = save_checkpoint(accelerator, tmp_path / "phase", Counters(0, 1, 0, 0), keep_last=1,
                           trainable=params, frozen=frozen_reference(base_dir, None))
    assert load_checkpoint(accelerator, path, trainable=params, frozen=frozen_reference(base_dir, None)).step == 1
    save_file({"w": torch.zeros(3)}, str(base_dir / "unet/diffusion_pytorch_model.safetensors"))
    with pytest.raises(UserError, match="frozen weights"):
        load_checkpoint(accelerator, path, trainable=params, frozen=frozen_reference(base_dir, None))
