"""Side-by-side image grids of the digits benchmarks: one column per model (or per model with
and without a plugin), the ten digits down, the same seeds across a row."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path

import torch


def side_by_side(grid_images: dict, columns: Sequence[Hashable], path: Path,
                 labels: Sequence[str] | None = None, scale: int = 3) -> None:
    """Columns of 10 digits × `per` samples with a gutter, `grid_images[key]` for each key of
    `columns` ((10·per, 3, H, W) in [0, 1], digit-major). A column's label is labels[i], by
    default its key as "name-steps"; pixels are scaled up `scale` times (nearest)."""
    from PIL import Image, ImageDraw

    labels = list(labels) if labels is not None else [f"{name}-{steps}" for name, steps in columns]
    if len(labels) != len(columns):
        raise ValueError(f"{len(labels)} labels for {len(columns)} columns")
    tiles = []
    for key in columns:
        imgs = grid_images[key]
        per = len(imgs) // 10
        h, w = imgs.shape[-2:]
        block = torch.ones(3, 10 * h, per * w)
        for i, img in enumerate(imgs):
            d, k = divmod(i, per)
            block[:, d * h:(d + 1) * h, k * w:(k + 1) * w] = img
        tiles.append(block)
    gutter, label_h = 12, 18
    bw, bh = tiles[0].shape[2] * scale, tiles[0].shape[1] * scale
    canvas = Image.new("RGB", (len(tiles) * (bw + gutter) + gutter, bh + label_h + gutter), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (tile, label) in enumerate(zip(tiles, labels)):
        arr = (tile.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        im = Image.fromarray(arr).resize((bw, bh), Image.NEAREST)
        x = gutter + i * (bw + gutter)
        canvas.paste(im, (x, label_h))
        draw.text((x + 2, 2), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
