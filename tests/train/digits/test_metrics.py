"""The digits evaluator: Fréchet distance in a digit classifier's feature space and prompt
accuracy, checked in closed form and on real digits vs noise."""

from __future__ import annotations

import pytest
import torch

from train.digits.builder import ensure_digits_model
from train.digits.data import digits_images, digits_split
from train.digits.metrics import (
    DigitClassifier,
    digits_fd,
    ensure_digits_classifier,
    evaluate_pipeline,
    frechet_distance,
    held_out_images,
    prompt_accuracy,
    render_digits,
)
from train.pipeline import load_pipeline
from train.validation import save_grid


@pytest.fixture(scope="session")
def classifier(digits_cache):
    return ensure_digits_classifier(digits_cache)


@pytest.fixture(scope="session")
def train_real():
    data, split = digits_images(), digits_split()
    return data.images[torch.from_numpy(split.train)].float() / 255


def test_frechet_distance_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g) @ torch.randn(8, 8, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.arange(8.0)
    # Same covariance, shifted mean: FD = ‖shift‖².
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.square().sum()), rel=1e-6)
    # Doubling a centred set: Tr(C + 4C − 2·2C) = Tr(C).
    centred = a - a.mean(0)
    cov_trace = torch.cov(centred.T.double()).trace().item()
    assert frechet_distance(centred, 2 * centred) == pytest.approx(cov_trace, rel=1e-5)


def test_classifier_reads_held_out_digits(classifier):
    real, labels = held_out_images()
    assert prompt_accuracy(real, labels, classifier) >= 0.9
    assert classifier.features(real[:4]).shape == (4, DigitClassifier.feature_dim)


def test_real_digits_are_close_and_noise_is_far(classifier, train_real):
    real, labels = held_out_images()
    fd_real = digits_fd(real, train_real, classifier)
    noise = torch.rand(len(real), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    fd_noise = digits_fd(noise, train_real, classifier)
    assert fd_real < 0.05 * fd_noise
    assert prompt_accuracy(noise, labels, classifier) < 0.3  # about chance (0.1)
    # A wrong prompt on real digits scores like chance too.
    assert prompt_accuracy(real, (labels + 1) % 10, classifier) < 0.1


def test_classifier_cache_is_reused(classifier, digits_cache):
    again = ensure_digits_classifier(digits_cache)
    for (k, v), w in zip(classifier.state_dict().items(), again.state_dict().values()):
        assert torch.equal(v, w), k


def test_evaluate_pipeline_on_tiny_model(classifier, digits_cache, tmp_path):
    pipe = load_pipeline(ensure_digits_model(digits_cache, "tiny"))
    pipe.set_progress_bar_config(disable=True)
    result = evaluate_pipeline(pipe, 1, per_digit=2, guidance_scale=3.0, classifier=classifier)
    assert result.num_images == 20 and result.num_steps == 1
    assert torch.isfinite(torch.tensor([result.fd, result.accuracy])).all()
    assert 0 <= result.accuracy <= 1 and len(result.per_digit_accuracy) == 10
    # Each image has its own seeded generator: batching does not change the samples.
    a = render_digits(pipe, 1, 1, 3.0, seed=5, batch_size=10)
    b = render_digits(pipe, 1, 1, 3.0, seed=5, batch_size=3)
    assert torch.allclose(a.images, b.images, atol=1e-5)
    assert a.labels.tolist() == list(range(10))
    save_grid(a.images, tmp_path / "grid.png", columns=5, gutter=1)
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (5 * 33 + 1, 2 * 33 + 1)
