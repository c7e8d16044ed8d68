"""Render prompts with an export through the diffusers SDXL pipeline, the code users run.

A UNet export loads as the released SDXL-Lightning README shows (`from_config` +
`load_state_dict`), a LoRA export with `pipe.load_lora_weights(path); pipe.fuse_lora()`, a
single-file checkpoint with `from_single_file(path, config=base)` (train/single_file.py); the
scheduler is Euler on the trailing grid with the export's prediction type, guidance is off, and
the step count is the one the export was distilled for, read from its metadata (METHOD.md §6).

Launch: python -m train.generate --base digits:full --export RUN/export/NAME_4step_unet.safetensors \
            --prompt "a handwritten digit seven" [--prompt ...] [--seed 0] [--out grid.png]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from train.export import CHECKPOINT_FORMAT, LORA_FORMAT, UNET_FORMAT, ExportInfo, read_export_info


def resolve_base_dir(base: str) -> Path:
    """A diffusers folder, or digits:tiny / digits:full (built into the cache on first use)."""
    from train.config import ModelConfig
    from train.models import resolve_base

    return resolve_base(ModelConfig(base=base))


def load_export_pipeline(base_dir: str | Path, export_path: str | Path, *,
                         dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """(StableDiffusionXLPipeline with the export applied, its ExportInfo)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    info = read_export_info(export_path)
    base_dir = str(base_dir)
    if info.format == UNET_FORMAT:
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base_dir, subfolder="unet"))
        unet.load_state_dict(load_file(str(export_path)))
        pipe = StableDiffusionXLPipeline.from_pretrained(base_dir, unet=unet.to(dtype), torch_dtype=dtype,
                                                         add_watermarker=False)
    elif info.format == LORA_FORMAT:
        pipe = StableDiffusionXLPipeline.from_pretrained(base_dir, torch_dtype=dtype, add_watermarker=False)
        pipe.load_lora_weights(str(export_path))
        pipe.fuse_lora()
    elif info.format == CHECKPOINT_FORMAT:  # from_single_file, the base folder as its config
        from train.single_file import load_single_file_pipeline

        pipe = load_single_file_pipeline(export_path, base_dir, dtype)
    else:
        raise ValueError(f"{export_path}: unknown export format {info.format!r}")
    pipe.scheduler = EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, timestep_spacing=info.scheduler.get("timestep_spacing", "trailing"),
        prediction_type=info.prediction_type)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), info


def choose_steps(info: ExportInfo, requested: int | None, force: bool = False) -> int:
    """The export's own step count, unless another is requested and forced."""
    if requested is None or requested == info.num_inference_steps:
        return info.num_inference_steps
    if not force:
        raise ValueError(
            f"{info.path.name} was distilled for {info.num_inference_steps} steps, not {requested}: "
            "other step counts give degraded images (pass --force-steps to try anyway)")
    return requested


@torch.no_grad()
def render(pipe, prompts: list[str], num_steps: int, seed: int, images_per_prompt: int = 1
           ) -> list[Image.Image]:
    """Images for `prompts` (prompt-major), guidance off, from one seeded generator."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt=prompts, num_inference_steps=num_steps, guidance_scale=0.0,
                num_images_per_prompt=images_per_prompt, generator=generator).images


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="base model folder, or digits:tiny / digits:full")
    parser.add_argument("--export", required=True, type=Path, help="a train.export .safetensors file")
    parser.add_argument("--lora", action="store_true", help="require the export to be a LoRA")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for more prompts")
    parser.add_argument("--steps", type=int, help="default: the export's own step count")
    parser.add_argument("--force-steps", action="store_true", help="allow another step count")
    parser.add_argument("--images-per-prompt", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("grid.png"))
    args = parser.parse_args(argv)

    try:
        info = read_export_info(args.export)
        steps = choose_steps(info, args.steps, args.force_steps)
    except ValueError as err:
        parser.error(str(err))
    if args.lora and info.format != LORA_FORMAT:
        parser.error(f"--lora: {args.export} is a {info.format} export, not a LoRA")
    pipe, info = load_export_pipeline(resolve_base_dir(args.base), args.export)
    images = render(pipe, args.prompt, steps, args.seed, args.images_per_prompt)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, columns=args.images_per_prompt if len(args.prompt) > 1 else len(images)).save(args.out)
    print(f"{args.out}: {len(args.prompt)} prompt(s), {steps} steps, {info.format}, "
          f"prediction_type={info.prediction_type}")
    return args.out


if __name__ == "__main__":
    main()
