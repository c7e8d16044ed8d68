"""What the plugin-compatibility benchmark measures on digits (issue #14; METHOD.md §7's claim
that LoRAs and ControlNets trained for the base keep working on the distilled students):
the style the LoRA adds, the control the ControlNet follows, as pure functions of images.

- The style is *bold strokes*: training digits dilated by `dilate`, prompted with
  `styled_prompt_for(7) == "a bold handwritten digit seven"`. Its strength is `stroke_width`:
  ink area over skeleton length, the skeleton length taken as half the perimeter
  (a stroke of width w and length L ≫ w has area wL and perimeter 2(L + w) ≈ 2L, so
  2·area/perimeter ≈ w). Unlike ink area it does not grow with the digit's size (a bigger
  digit has longer strokes, not wider ones), it needs no skeletonisation library, and it is
  closed-form on bars and squares (tests/train/digits/test_plugins.py).
- The control is a *coarse silhouette*: which `cell`×`cell` pixel blocks of a digit hold ink
  (`silhouette`), at the latent grid's scale when cell is the VAE's downsampling factor. The
  ControlNet sees it as an image (`silhouette_image`); adherence is the IoU of the generated
  image's own silhouette with the one asked for (`silhouette_iou`), the same coarsening on
  both sides, so a thin stroke inside a thick cell still counts as following the control.
- A plugin's effect is the metric with the plugin minus without it, on the same prompts and
  seeds (`PluginEffect`); a student keeps `ratio` of the teacher's effect.

Images are [0, 1] floats (N, 3, H, W), ink bright on black, as `render_digits` returns them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from train.digits.data import DIGIT_NAMES
from train.digits.metrics import paired_bootstrap

STYLE_WORD = "bold"
INK_THRESHOLD = 0.5  # gray level above which a pixel is ink: the midpoint of [0, 1]


def styled_prompt_for(digit: int) -> str:
    """The style LoRA's caption of a digit class: "a bold handwritten digit seven"."""
    return f"a {STYLE_WORD} handwritten digit {DIGIT_NAMES[int(digit)]}"


def ink_mask(images: Tensor, threshold: float = INK_THRESHOLD) -> Tensor:
    """(N, H, W) bool: pixels whose gray level (channel mean) is above `threshold`."""
    return images.float().mean(dim=1) > threshold


def dilate(images: Tensor, radius_px: int) -> Tensor:
    """Grayscale dilation by a (2·radius_px + 1)² square: every stroke `2·radius_px` pixels
    wider. Any dtype (uint8 digits stay uint8), shape (N, C, H, W)."""
    if radius_px < 0:
        raise ValueError(f"dilation radius must be >= 0 pixels, got {radius_px}")
    if radius_px == 0:
        return images.clone()
    k = 2 * radius_px + 1
    return F.max_pool2d(images.float(), k, stride=1, padding=radius_px).to(images.dtype)


def stroke_width(images: Tensor, threshold: float = INK_THRESHOLD) -> Tensor:
    """(N,) mean stroke width in pixels: 2·ink area / ink perimeter (see the module docstring).

    The perimeter counts ink/background pixel edges (4-connectivity, the frame counting as
    background), so holes add their inner boundary. An image without ink has width 0.
    """
    ink = ink_mask(images, threshold)
    area = ink.sum(dim=(1, 2)).float()
    padded = F.pad(ink, (1, 1, 1, 1))
    perimeter = ((padded[:, 1:, :] != padded[:, :-1, :]).sum(dim=(1, 2))
                 + (padded[:, :, 1:] != padded[:, :, :-1]).sum(dim=(1, 2))).float()
    return 2 * area / perimeter.clamp(min=1)


def silhouette(images: Tensor, cell_px: int, threshold: float = INK_THRESHOLD) -> Tensor:
    """(N, H / cell, W / cell) bool: the cells of `cell_px`² pixels that hold any ink."""
    h, w = images.shape[-2:]
    if h % cell_px or w % cell_px:
        raise ValueError(f"image size {h}×{w} is not a multiple of the silhouette cell {cell_px} px")
    ink = ink_mask(images, threshold).float().unsqueeze(1)
    return F.max_pool2d(ink, cell_px).squeeze(1) > 0


def silhouette_image(silhouettes: Tensor, cell_px: int) -> Tensor:
    """(N, 3, H, W) [0, 1] float: a silhouette as the ControlNet's conditioning image (white
    cells on black, nearest upsampling), the range the pipeline's control image processor
    passes through unchanged."""
    img = silhouettes.float().unsqueeze(1).repeat_interleave(cell_px, -2).repeat_interleave(cell_px, -1)
    return img.repeat(1, 3, 1, 1)


def silhouette_iou(images: Tensor, target: Tensor, cell_px: int) -> Tensor:
    """(N,) intersection over union of each image's silhouette with `target` (N, h, w) bool.
    Two empty silhouettes agree (IoU 1)."""
    mask = silhouette(images, cell_px)
    if mask.shape != target.shape:
        raise ValueError(f"silhouettes {tuple(mask.shape)} and targets {tuple(target.shape)} differ")
    inter = (mask & target).sum(dim=(1, 2)).float()
    union = (mask | target).sum(dim=(1, 2)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@dataclass(frozen=True)
class PluginEffect:
    """A metric averaged over the same prompts and seeds, with and without a plugin."""

    without_plugin: float
    with_plugin: float
    # per image (same order for every model: same prompts and seeds), with − without
    per_image: Tensor | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, without_plugin: Tensor, with_plugin: Tensor) -> PluginEffect:
        """From per-image metrics (N,) of the same prompts and seeds."""
        return cls(without_plugin.double().mean().item(), with_plugin.double().mean().item(),
                   (with_plugin.double() - without_plugin.double()).cpu())

    @property
    def effect(self) -> float:
        return self.with_plugin - self.without_plugin

    def ratio(self, reference: PluginEffect) -> float:
        """This effect as a fraction of the reference's (teacher-32's): 1 keeps all of it."""
        if reference.effect == 0:
            return float("nan")
        return self.effect / reference.effect

    def ratio_interval(self, reference: PluginEffect, confidence: float = 0.9, draws: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
        """Percentile-bootstrap interval of `ratio`: images resampled with replacement, the same
        draw for both models (paired: image i has the same prompt and seed in each)."""
        a, b = self.per_image, reference.per_image
        if a is None or b is None or len(a) != len(b):
            raise ValueError("a bootstrap interval needs both effects' per-image values, paired")
        return paired_bootstrap(a, b, torch.div, confidence, draws, seed)


@dataclass(frozen=True)
class ControlTargets:
    silhouettes: Tensor  # (10·per_digit, H / cell, W / cell) bool, digit-major
    images: Tensor  # (10·per_digit, 3, H, W) the same as the ControlNet's conditioning images


def control_targets(images: Tensor, labels: Tensor, per_digit: int, cell_px: int) -> ControlTargets:
    """For the k-th image rendered of digit d (digit-major order, as `render_digits`), the
    silhouette of the k-th of `images` labelled d (cycling when there are fewer): every prompt
    gets a shape of its own digit to follow."""
    picks = []
    for digit in range(10):
        of_digit = (labels == digit).nonzero().flatten()
        if len(of_digit) == 0:
            raise ValueError(f"no image of digit {digit} to take a control silhouette from")
        picks.append(of_digit[torch.arange(per_digit) % len(of_digit)])
    masks = silhouette(images[torch.cat(picks)], cell_px)
    return ControlTargets(masks, silhouette_image(masks, cell_px))
