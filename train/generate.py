"""Render prompts with an export through the diffusers SDXL pipeline, the code users run.

The export is applied as users apply it (`train.pipeline.load_pipeline`: a UNet through
`from_config` + `load_state_dict`, a LoRA through `load_lora_weights` + `fuse_lora`, a single-file
checkpoint through `from_single_file(path, config=base)`, Euler on the trailing grid with the
export's prediction type); guidance is off, and the step count is the one the export was
distilled for, read from its metadata (METHOD.md §6). The images are written as one grid,
prompt-major (`train.validation.save_grid`). A missing, damaged or non-finite export, or a base
that is not SDXL-style, ends with one line `error: ...` (exit status 2), never a traceback or
an image of NaNs; `--debug` adds the traceback.

Launch: python -m train.generate --base digits:full --export RUN/export/NAME_4step_unet.safetensors \
            --prompt "a handwritten digit seven" [--prompt ...] [--seed 0] [--out grid.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from train.config import ModelConfig
from train.embedded import resolve_base
from train.errors import UserError, add_debug_flag, run_cli
from train.export_info import LORA_FORMAT, ExportInfo, verify_export
from train.pipeline import load_pipeline
from train.validation import save_grid


def resolve_base_dir(base: str) -> Path:
    """A diffusers folder, or digits:tiny / digits:full[:seed<N>] (built into the cache on first use)."""
    return resolve_base(ModelConfig(base=base))


def choose_steps(info: ExportInfo, requested: int | None, force: bool = False) -> int:
    """The export's own step count, unless another is requested and forced."""
    if requested is None or requested == info.num_inference_steps:
        return info.num_inference_steps
    if not force:
        raise UserError(f"{info.path.name} was distilled for {info.num_inference_steps} steps, not "
                        f"{requested}", "--steps", "other step counts give degraded images; pass "
                        "--force-steps to try anyway")
    return requested


@torch.no_grad()
def render(pipe, prompts: list[str], num_steps: int, seed: int, images_per_prompt: int = 1
           ) -> list[Image.Image]:
    """Images for `prompts` (prompt-major), guidance off, from one seeded generator."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt=prompts, num_inference_steps=num_steps, guidance_scale=0.0,
                num_images_per_prompt=images_per_prompt, generator=generator).images


def to_tensor(images: list[Image.Image]) -> Tensor:
    """PIL RGB images as (N, 3, H, W) floats in [0, 1] (exact: k/255 rounds back to k)."""
    return torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
                        for im in images]).float().div(255)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="base model folder, or digits:tiny / digits:full[:seed<N>]")
    parser.add_argument("--export", required=True, type=Path, help="a train.export .safetensors file")
    parser.add_argument("--lora", action="store_true", help="require the export to be a LoRA")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for more prompts")
    parser.add_argument("--steps", type=int, help="default: the export's own step count")
    parser.add_argument("--force-steps", action="store_true", help="allow another step count")
    parser.add_argument("--images-per-prompt", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("grid.png"))
    add_debug_flag(parser)
    args = parser.parse_args(argv)

    info = verify_export(args.export)
    steps = choose_steps(info, args.steps, args.force_steps)
    if args.lora and info.format != LORA_FORMAT:
        raise UserError(f"a {info.format} export, not a LoRA", args.export, "drop --lora or pass a LoRA export")
    pipe = load_pipeline(resolve_base_dir(args.base), args.export)
    images = render(pipe, args.prompt, steps, args.seed, args.images_per_prompt)
    try:
        save_grid(to_tensor(images), args.out, columns=args.images_per_prompt if len(args.prompt) > 1 else len(images))
    except OSError as err:
        raise UserError(f"cannot write the image: {err.strerror or err}", args.out,
                        "choose a writable --out path") from None
    print(f"{args.out}: {len(args.prompt)} prompt(s), {steps} steps, {info.format}, "
          f"prediction_type={info.prediction_type}")
    return args.out


if __name__ == "__main__":
    sys.exit(run_cli(main))
