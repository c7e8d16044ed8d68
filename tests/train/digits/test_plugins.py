"""train/digits/plugins.py: the plugin benchmark's metrics in closed form on drawn shapes."""

from __future__ import annotations

import math

import pytest
import torch

from train.digits.plugins import (
    PluginEffect,
    control_targets,
    dilate,
    ink_mask,
    silhouette,
    silhouette_image,
    silhouette_iou,
    stroke_width,
    styled_prompt_for,
)


def canvas(n: int = 1, size: int = 32) -> torch.Tensor:
    return torch.zeros(n, 3, size, size)


def bar(width: int, length: int, top: int = 4, left: int = 4) -> torch.Tensor:
    img = canvas()
    img[:, :, top:top + width, left:left + length] = 1.0
    return img


def test_styled_prompt_names_the_style_and_the_digit():
    assert styled_prompt_for(7) == "a bold handwritten digit seven"


def test_ink_is_the_channel_mean_above_one_half():
    img = canvas()
    img[0, 0, 1, 1] = 1.0  # one channel of three: gray 1/3, not ink
    img[0, :, 2, 2] = 0.6
    assert ink_mask(img)[0].nonzero().tolist() == [[2, 2]]


@pytest.mark.parametrize("width,length", [(2, 20), (4, 20), (5, 12)])
def test_stroke_width_of_a_bar_is_area_over_half_its_perimeter(width, length):
    # area w·L, perimeter 2(w + L): 2·area/perimeter = wL / (w + L), → w as L grows
    assert stroke_width(bar(width, length)).item() == pytest.approx(width * length / (width + length))


def test_stroke_width_counts_a_hole_and_ignores_size():
    ring = canvas()
    ring[:, :, 4:12, 4:12] = 1.0
    ring[:, :, 6:10, 6:10] = 0.0  # a 2-px-wide square ring: area 48, perimeter 32 + 16
    assert stroke_width(ring).item() == pytest.approx(2.0)
    big_ring = canvas()
    big_ring[:, :, 2:30, 2:30] = 1.0
    big_ring[:, :, 4:28, 4:28] = 0.0  # the same stroke, a much larger shape: width stays near 2
    assert stroke_width(big_ring).item() == pytest.approx(2 * (28 ** 2 - 24 ** 2) / (4 * 28 + 4 * 24))
    assert stroke_width(canvas()).item() == 0.0  # no ink


def test_dilation_widens_every_stroke_by_twice_the_radius():
    thin = bar(2, 20, top=10, left=6)
    bold = dilate(thin, 1)
    assert stroke_width(bold).item() == pytest.approx(4 * 22 / (4 + 22))
    assert stroke_width(dilate(thin, 2)).item() > stroke_width(bold).item() > stroke_width(thin).item()
    digits_uint8 = (thin * 255).to(torch.uint8)
    assert dilate(digits_uint8, 1).dtype == torch.uint8
    assert torch.equal(dilate(thin, 0), thin)
    with pytest.raises(ValueError):
        dilate(thin, -1)


def test_silhouette_marks_the_cells_holding_ink():
    img = canvas()
    img[0, :, 5, 9] = 1.0  # row 5, column 9 → cell (1, 2) of 4-px cells
    sil = silhouette(img, 4)
    assert sil.shape == (1, 8, 8) and sil[0].nonzero().tolist() == [[1, 2]]
    # the conditioning image is the same silhouette, pixel cells at full size
    cond = silhouette_image(sil, 4)
    assert cond.shape == (1, 3, 32, 32) and cond.sum().item() == 3 * 16
    assert torch.equal(silhouette(cond, 4), sil)
    with pytest.raises(ValueError, match="multiple"):
        silhouette(canvas(size=30), 4)


def test_silhouette_iou_in_closed_form():
    left, right = canvas(), canvas()
    left[:, :, :, :16] = 1.0  # cells of columns 0..3
    right[:, :, :, 8:24] = 1.0  # cells of columns 2..5: 2 shared of 6 → 1/3
    target = silhouette(right, 4)
    assert silhouette_iou(right, target, 4).item() == pytest.approx(1.0)
    assert silhouette_iou(left, target, 4).item() == pytest.approx(1 / 3)
    far = canvas()
    far[:, :, :, 28:] = 1.0
    assert silhouette_iou(far, silhouette(left, 4), 4).item() == 0.0
    assert silhouette_iou(canvas(), silhouette(canvas(), 4), 4).item() == 1.0  # both empty agree
    with pytest.raises(ValueError, match="differ"):
        silhouette_iou(canvas(2), target, 4)


def test_control_targets_give_each_prompt_a_silhouette_of_its_own_digit():
    images = torch.rand(30, 3, 32, 32)
    labels = torch.arange(10).repeat(3)  # three images per digit
    targets = control_targets(images, labels, per_digit=4, cell_px=4)
    assert targets.silhouettes.shape == (40, 8, 8) and targets.images.shape == (40, 3, 32, 32)
    # digit 7's four prompts take its three images in order, then cycle to the first again
    sevens = [7, 17, 27, 7]
    assert torch.equal(targets.silhouettes[28:32], silhouette(images[sevens], 4))
    assert torch.equal(silhouette(targets.images, 4), targets.silhouettes)
    with pytest.raises(ValueError, match="digit 9"):
        control_targets(images[labels != 9], labels[labels != 9], 1, 4)


def test_plugin_effect_and_its_ratio_to_the_reference():
    teacher = PluginEffect(without_plugin=4.0, with_plugin=6.0)
    student = PluginEffect(without_plugin=3.5, with_plugin=5.3)
    assert student.effect == pytest.approx(1.8)
    assert student.ratio(teacher) == pytest.approx(0.9)
    assert math.isnan(student.ratio(PluginEffect(1.0, 1.0)))


def test_plugin_effect_from_per_image_values_and_its_paired_bootstrap_interval():
    g = torch.Generator().manual_seed(0)
    without = torch.rand(400, generator=g)
    teacher = PluginEffect.of(without, without + 1.0 + 0.3 * torch.randn(400, generator=g))
    same = PluginEffect.of(without, without + teacher.per_image)  # the teacher's effect exactly
    assert same.ratio(teacher) == pytest.approx(1.0)
    assert same.ratio_interval(teacher) == pytest.approx((1.0, 1.0))  # paired: no spread
    half = PluginEffect.of(without, without + 0.5 + 0.3 * torch.randn(400, generator=g))
    lo, hi = half.ratio_interval(teacher, confidence=0.9)
    assert lo < half.ratio(teacher) < hi and 0.4 < lo and hi < 0.6
    with pytest.raises(ValueError, match="paired"):
        PluginEffect(1.0, 2.0).ratio_interval(teacher)
