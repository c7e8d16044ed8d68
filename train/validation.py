"""Validation grids: fixed prompts and seeds through the reference sampler, saved as PNG.

The sampler reproduces the diffusers pipeline users will run (distill/sampling.py), so the
grids show what an export of the student at this step would produce.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from distill.sampling import decode_latents, sample
from train.text import TextEncoders

DIGIT_PROMPTS = [f"a handwritten digit {name}" for name in
                 ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]


@torch.no_grad()
def render(unet, prediction_type: str, num_steps: int, *, schedule, vae, text: TextEncoders,
           prompts: list[str], images_per_prompt: int, seed: int, resolution: int,
           guidance_scale: float = 0.0) -> Tensor:
    """Images (P·K, 3, H, W) in [0, 1]; row p holds prompt p's K seeds."""
    captions = [p for p in prompts for _ in range(images_per_prompt)]
    device = next(unet.parameters()).device
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]],
                            dtype=torch.float32).repeat(len(captions), 1)
    cond = text.conditioning(captions, time_ids).to(device)
    latent_size = resolution // (2 ** (len(vae.config.block_out_channels) - 1))
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(captions), unet.config.in_channels, latent_size, latent_size, generator=g)
    was_training = unet.training
    unet.eval()
    latents = sample(unet, schedule, noise.to(device), cond, num_steps, prediction_type, guidance_scale)
    unet.train(was_training)
    return decode_latents(vae, latents)


def save_grid(images: Tensor, ncols: int, path: Path, scale: int = 1) -> Path:
    """Tile (N, 3, H, W) images in [0, 1] into a PNG with `ncols` columns."""
    n, _, h, w = images.shape
    rows = (n + ncols - 1) // ncols
    canvas = np.ones((rows * h, ncols * w, 3), dtype=np.uint8) * 255
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = arr[i]
    image = Image.fromarray(canvas)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
