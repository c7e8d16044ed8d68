"""The digits every part of the embedded model shares: images, the split, prompts, and the info
file of a built model.

scikit-learn's handwritten digits (`sklearn.datasets.load_digits`, 1,797 8×8 images shipped
inside scikit-learn), upsampled to 32×32 RGB uint8. Prompts name the digit:
`prompt_for(7) == "a handwritten digit seven"`. The held-out split of `digits_split` is never
trained on (not by the model builder, the shards or the evaluator's classifier); it is only used
for evaluation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RESOLUTION = 32  # pixels; the VAE downsamples by 4 to 8×8 latents
TIME_IDS = (RESOLUTION, RESOLUTION, 0, 0, RESOLUTION, RESOLUTION)  # SDXL micro-cond, height first
INFO_FILE = "digits_model.json"  # a built model's size, guidance scale, resolution, metrics


def prompt_for(digit: int) -> str:
    """The caption of a digit class: "a handwritten digit seven"."""
    return f"a handwritten digit {DIGIT_NAMES[int(digit)]}"


DIGIT_PROMPTS = tuple(prompt_for(digit) for digit in range(10))  # zero..nine: validation's default


@dataclass(frozen=True)
class DigitsData:
    images: torch.Tensor  # (N, 3, 32, 32) uint8, ink bright on black
    labels: torch.Tensor  # (N,) int64 in 0..9


@dataclass(frozen=True)
class DigitsSplit:
    train: np.ndarray  # indices into `digits_images()`, ~85 %
    eval: np.ndarray  # held-out indices, ~15 %, stratified by label; never trained on


@lru_cache(maxsize=2)
def digits_images(resolution: int = RESOLUTION) -> DigitsData:
    """All 1,797 digits as uint8 RGB at `resolution` (bilinear upsampling of the 0..16 grid).

    uint8 so that the PNG shards, the VAE's training data and the evaluator's real images
    are bit-identical.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images).float().div(16.0).unsqueeze(1)
    x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1).mul(255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    return DigitsData(x.contiguous(), torch.from_numpy(digits.target).long())


SPLIT_SEED = 0  # the canonical split: every model seed trains on the same training digits


def digits_split(seed: int = SPLIT_SEED) -> DigitsSplit:
    """The deterministic stratified 85/15 train/held-out split every component shares.

    Builders, shards and the evaluator all use the default seed, so the held-out digits are
    never trained on whatever seed a model is built with.
    """
    from sklearn.model_selection import train_test_split

    labels = digits_images().labels.numpy()
    train, held_out = train_test_split(np.arange(len(labels)), test_size=0.15,
                                       random_state=seed, stratify=labels)
    return DigitsSplit(np.sort(train), np.sort(held_out))


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [−1, 1], the VAE's pixel range."""
    return images_uint8.float().div(127.5).sub(1.0)


def read_model_info(model_dir: str | os.PathLike) -> dict:
    """The `digits_model.json` of a built model (guidance scale, resolution, metrics).

    Here rather than in builder.py because the evaluator reads it and the builder evaluates.
    """
    return json.loads((Path(model_dir) / INFO_FILE).read_text())
