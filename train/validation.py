"""Validation grids: fixed prompts and seeds through the reference sampler, saved as PNG.

The sampler reproduces the diffusers pipeline users will run (distill/sampling.py), so the
grids show what an export of the student at this step would produce.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from distill.sampling import decode_latents, sample
from train.files import atomic_file
from train.text import TextEncoders, latent_size


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
    size = latent_size(vae, resolution)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(captions), unet.config.in_channels, size, size, generator=g)
    was_training = unet.training
    unet.eval()
    latents = sample(unet, schedule, noise.to(device), cond, num_steps, prediction_type, guidance_scale)
    unet.train(was_training)
    return decode_latents(vae, latents)


def save_grid(images: Tensor, path: str | Path, columns: int, *, gutter: int = 0, scale: int = 1) -> Path:
    """Tile (N, 3, H, W) images in [0, 1] row-major into a PNG with `columns` per row.

    gutter: pixels of mid-grey between and around the tiles; scale: nearest-neighbour upscaling.
    """
    n, c, h, w = images.shape
    rows = -(-n // columns)
    step_h, step_w = h + gutter, w + gutter
    grid = torch.full((c, rows * step_h + gutter, columns * step_w + gutter), 0.5 if gutter else 1.0)
    for i, img in enumerate(images.detach().cpu().float()):
        r, k = divmod(i, columns)
        top, left = gutter + r * step_h, gutter + k * step_w
        grid[:, top:top + h, left:left + w] = img
    image = Image.fromarray((grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy())
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:  # a grid that exists is whole: a resumed run trusts it
        image.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))
    return path
