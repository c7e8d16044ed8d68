"""Non-finite weights are never written or read silently, in-process on the tiny digits UNet:
a student final with a NaN is refused when saved (Diverged) and when loaded (DamagedFile), and
an export whose fp16 cast overflows is refused before anything is written."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from train.config import config_to_yaml, load_config
from train.digits.builder import ensure_digits_model
from train.errors import DamagedFile, Diverged
from train.export import export_stage
from train.manifest import write_manifest
from train.models import load_student_tensors, save_student, student_problems

ROOT = Path(__file__).resolve().parents[2]
STAGE = 3  # configs/tiny.yaml's 2-step stage


@pytest.fixture(scope="module")
def unet(digits_cache) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(ensure_digits_model(digits_cache, "tiny"), subfolder="unet")


def test_a_student_with_a_nan_is_not_written(unet, tmp_path):
    broken = UNet2DConditionModel.from_config(unet.config)
    broken.load_state_dict(unet.state_dict())
    with torch.no_grad():
        broken.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(Diverged, match=r"non-finite weights \(NaN or Inf\) in 1 tensor\(s\): conv_in.weight"):
        save_student(broken, "epsilon", tmp_path / "final", origin="test")
    assert not (tmp_path / "final").exists() and not (tmp_path / "final.tmp").exists()


def test_a_student_with_a_nan_is_not_read(unet, tmp_path):
    final = tmp_path / "final"
    save_student(unet, "epsilon", final, origin="test")
    assert student_problems(final) == []
    weights = load_file(final / "unet.safetensors")
    weights["conv_out.bias"] = torch.full_like(weights["conv_out.bias"], float("inf"))
    save_file(weights, final / "unet.safetensors")
    (final / "manifest.json").unlink()
    write_manifest(final)  # a matching manifest: only the finiteness check can tell
    assert student_problems(final) == ["unet.safetensors: non-finite weights (NaN or Inf) in 1 tensor(s): "
                                       "conv_out.bias"]
    with pytest.raises(DamagedFile, match="conv_out.bias"):
        load_student_tensors(final)


def test_an_export_that_overflows_fp16_is_refused(unet, digits_cache, tmp_path):
    cfg = load_config(ROOT / "configs/tiny.yaml", [f"output_dir={tmp_path}", f"model.cache_dir={digits_cache}"])
    cfg = dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, dtype="fp16", single_file=False,
                                                              workflows=False, model_card=False))
    (tmp_path / "config.yaml").write_text(config_to_yaml(cfg))
    big = UNet2DConditionModel.from_config(unet.config)
    big.load_state_dict(unet.state_dict())
    with torch.no_grad():
        big.conv_in.bias[0] = 1e6  # finite in fp32, inf in fp16
    save_student(big, "epsilon", tmp_path / "stages/2step/final", origin="test")
    with pytest.raises(Diverged, match="export would hold non-finite weights.*conv_in.bias.*--dtype bf16"):
        export_stage(tmp_path, cfg, STAGE)
    assert not list((tmp_path / "export").glob("*.safetensors"))
