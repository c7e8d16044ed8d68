"""The one diffusers pipeline loader: a base model folder as `StableDiffusionXLPipeline`, sampled
with Euler on the trailing grid, optionally with an export of this framework applied the way
users apply it (METHOD.md §6).

A UNet export loads as the released SDXL-Lightning README shows (`from_config` +
`load_state_dict`), a LoRA export with `pipe.load_lora_weights(path); pipe.fuse_lora()`, a
single-file checkpoint with `from_single_file(path, config=base)` (train/single_file.py); the
scheduler takes the export's prediction type and timestep spacing from its metadata.
`python -m train.generate`, the sweep's and the benchmark's evaluations all load through here,
so every number is measured on the code path users run. An export is verified before it is
loaded (`verify_export`): a damaged or non-finite file is refused, never rendered.
"""

from __future__ import annotations

import os

import torch

from train.errors import UserError
from train.export_info import CHECKPOINT_FORMAT, LORA_FORMAT, UNET_FORMAT, verify_export
from train.single_file import load_single_file_pipeline


def load_pipeline(base_dir: str | os.PathLike, export_path: str | os.PathLike | None = None, *,
                  prediction_type: str | None = None, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu"):
    """The base folder as an SDXL pipeline with trailing Euler, an export applied if given.

    prediction_type: the scheduler's; default the export's (its metadata), else the base's own.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    base_dir = str(base_dir)
    settings = {"timestep_spacing": "trailing"}
    if export_path is None:
        pipe = StableDiffusionXLPipeline.from_pretrained(base_dir, torch_dtype=dtype, add_watermarker=False)
    else:
        info = verify_export(export_path)  # intact and finite, or a one-line DamagedFile
        settings = {"timestep_spacing": info.scheduler.get("timestep_spacing", "trailing"),
                    "prediction_type": info.prediction_type}
        if info.format == UNET_FORMAT:
            from safetensors.torch import load_file

            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base_dir, subfolder="unet"))
            unet.load_state_dict(load_file(str(export_path)))
            pipe = StableDiffusionXLPipeline.from_pretrained(base_dir, unet=unet.to(dtype), torch_dtype=dtype,
                                                             add_watermarker=False)
        elif info.format == LORA_FORMAT:
            pipe = StableDiffusionXLPipeline.from_pretrained(base_dir, torch_dtype=dtype, add_watermarker=False)
            pipe.load_lora_weights(str(export_path))
            pipe.fuse_lora()
        elif info.format == CHECKPOINT_FORMAT:  # from_single_file, the base folder as its config
            pipe = load_single_file_pipeline(export_path, base_dir, dtype)
        else:
            raise UserError(f"unknown export format {info.format!r}", export_path,
                            f"pass a {UNET_FORMAT}, {LORA_FORMAT} or {CHECKPOINT_FORMAT} export")
    if prediction_type is not None:
        settings["prediction_type"] = prediction_type
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, **settings)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def with_controlnet(pipe, controlnet):
    """`pipe` (a base or a student, as `load_pipeline` returns it) as a
    `StableDiffusionXLControlNetPipeline` with `controlnet`: the same modules and scheduler
    (so a student's prediction type and timestep spacing carry over), as users combine a
    ControlNet trained for the base with a distilled UNet."""
    from diffusers import StableDiffusionXLControlNetPipeline

    controlled = StableDiffusionXLControlNetPipeline(**pipe.components, controlnet=controlnet,
                                                     add_watermarker=False)
    controlled.set_progress_bar_config(disable=True)
    return controlled.to(pipe.device)
