"""The digits every part of the embedded model shares: prompts, the split, the images."""

from __future__ import annotations

import numpy as np
import torch

from train.digits.data import DIGIT_NAMES, DIGIT_PROMPTS, digits_images, digits_split, prompt_for


def test_prompts_name_the_digit():
    assert prompt_for(7) == "a handwritten digit seven"
    assert [prompt_for(d).split()[-1] for d in range(10)] == list(DIGIT_NAMES)
    assert DIGIT_PROMPTS == tuple(prompt_for(d) for d in range(10))  # validation's default


def test_split_is_deterministic_disjoint_and_stratified():
    a, b = digits_split(0), digits_split(0)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.eval, b.eval)
    assert not np.array_equal(a.eval, digits_split(1).eval)
    assert len(np.intersect1d(a.train, a.eval)) == 0
    assert len(a.train) + len(a.eval) == 1797
    assert 0.13 < len(a.eval) / 1797 < 0.17
    counts = np.bincount(digits_images().labels.numpy()[a.eval], minlength=10)
    assert counts.min() >= 25  # every digit is in the held-out split


def test_images_are_32px_rgb_uint8_with_ink():
    data = digits_images()
    assert data.images.shape == (1797, 3, 32, 32) and data.images.dtype == torch.uint8
    assert torch.equal(data.images[:, 0], data.images[:, 1])  # gray replicated to RGB
    assert data.images.float().mean() > 10 and data.images.max() > 200
