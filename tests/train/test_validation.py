"""train/validation.py: validation grids are the reference sampler's images, tiled as PNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from train.config import ModelConfig
from train.embedded import resolve_base
from train.models import load_base
from train.validation import render, save_grid


def test_save_grid_tiles_row_major_with_gutter_and_scale(tmp_path):
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    images = colours[:, :, None, None].expand(3, 3, 2, 2)  # three 2×2 tiles
    path = save_grid(images, tmp_path / "sub" / "grid.png", columns=2, gutter=1, scale=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * (2 * 3 + 1), 2 * (2 * 3 + 1), 3)  # 2 rows, 2 columns, ×2
    pixel = lambda row, col: tuple(grid[2 * row, 2 * col])  # noqa: E731  (unscaled coordinates)
    assert pixel(0, 0) == (128, 128, 128)  # gutter
    assert pixel(1, 1) == (255, 0, 0) and pixel(1, 4) == (0, 255, 0) and pixel(4, 1) == (0, 0, 255)
    assert pixel(4, 4) == (128, 128, 128)  # the empty fourth cell stays background


@pytest.fixture(scope="module")
def base(digits_cache):
    cfg = ModelConfig(base="digits:tiny", cache_dir=str(digits_cache))
    return load_base(resolve_base(cfg), cfg, torch.device("cpu"), torch.float32)


def test_render_is_seeded_prompt_major_and_leaves_the_unet_mode(base):
    prompts = ["a handwritten digit one", "a handwritten digit seven"]
    kwargs = dict(schedule=base.schedule, vae=base.vae, text=base.text, prompts=prompts,
                  images_per_prompt=2, seed=3, resolution=32)
    base.unet.train()
    first = render(base.unet, base.prediction_type, 4, **kwargs)
    assert base.unet.training  # restored after sampling in eval mode
    base.unet.eval()
    again = render(base.unet, base.prediction_type, 4, **kwargs)
    assert first.shape == (4, 3, 32, 32)
    assert 0.0 <= float(first.min()) and float(first.max()) <= 1.0
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first[0], first[1])  # two seeds per prompt
    other = render(base.unet, base.prediction_type, 4, **{**kwargs, "seed": 4})
    assert not torch.allclose(first, other)
