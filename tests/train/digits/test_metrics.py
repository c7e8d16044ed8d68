"""The digits evaluator: Fréchet distance in a digit classifier's feature space, prompt
accuracy and the coverage metrics (k-NN precision/recall, within-prompt diversity), checked in
closed form and on real digits vs noise and vs a mode-collapsed selection of real digits."""

from __future__ import annotations

import pytest
import torch

from train.digits.builder import ensure_digits_model
from train.digits.data import digits_images, digits_split
from train.digits.metrics import (
    DigitClassifier,
    RenderedDigits,
    classifier_features,
    digits_fd,
    ensure_digits_classifier,
    evaluate_pipeline,
    frechet_distance,
    held_out_images,
    knn_radii,
    paired_bootstrap,
    per_image_diversity,
    precision_recall,
    prompt_accuracy,
    real_covered,
    render_digits,
    score_digits,
    within_prompt_diversity,
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


def test_knn_radii_by_hand():
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    # Nearest others: 0→1 (1), 1→0 (1), 3→1 (2), 7→3 (4); second nearest: 3, 2, 3, 6.
    assert knn_radii(points, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_radii(points, 2).tolist() == [3.0, 2.0, 3.0, 6.0]
    with pytest.raises(ValueError, match="k=4 needs more than 4"):
        knn_radii(points, 4)


def test_precision_recall_separate_fidelity_from_coverage():
    g = torch.Generator().manual_seed(0)
    mode_a = torch.randn(300, 4, generator=g)
    mode_b = torch.randn(300, 4, generator=g) + 20  # two well-separated modes
    real = torch.cat([mode_a, mode_b])
    same = torch.cat([torch.randn(300, 4, generator=g), torch.randn(300, 4, generator=g) + 20])
    full = precision_recall(same, real)
    assert full.precision > 0.9 and full.recall > 0.9
    # Collapse onto one mode: every sample is still realistic, half the real data is uncovered.
    collapsed = precision_recall(torch.randn(600, 4, generator=g), real)
    assert collapsed.precision > 0.9
    assert 0.4 < collapsed.recall < 0.55
    # Far from everything: neither.
    far = precision_recall(torch.randn(600, 4, generator=g) + 100, real)
    assert far.precision == 0 and far.recall == 0


def test_within_prompt_diversity_by_hand():
    feats = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [0.0, 2.0], [0.0, 4.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    # Prompt 0: one pair at distance 5. Prompt 1: pairs 2, 4, 2 → mean 8/3.
    assert within_prompt_diversity(feats, labels) == pytest.approx((5 + 8 / 3) / 2)
    # Identical samples per prompt (full collapse within a prompt): no diversity.
    assert within_prompt_diversity(torch.ones(4, 2), torch.tensor([0, 0, 1, 1])) == 0
    with pytest.raises(ValueError, match="at least two images"):
        within_prompt_diversity(torch.ones(2, 2), torch.tensor([0, 1]))
    # Per image: prompt 0's two images are 5 from each other; prompt 1's middle image (0, 2)
    # is 2 from both others, the outer two are 2 and 4 from the others.
    assert per_image_diversity(feats, labels).tolist() == pytest.approx([5, 5, 3, 2, 3])


def test_per_real_sample_coverage_is_the_recall_and_pairs_two_models():
    g = torch.Generator().manual_seed(0)
    real = torch.cat([torch.randn(200, 4, generator=g), torch.randn(200, 4, generator=g) + 20])
    both = torch.cat([torch.randn(300, 4, generator=g), torch.randn(300, 4, generator=g) + 20])
    one = torch.randn(600, 4, generator=g)  # collapsed onto the first mode
    for gen in (both, one):
        assert real_covered(gen, real).double().mean().item() == precision_recall(gen, real).recall
    covered_both, covered_one = real_covered(both, real), real_covered(one, real)
    assert not covered_one[200:].any()  # the second mode's real samples: uncovered by `one`
    lo, hi = paired_bootstrap(covered_both.double(), covered_one.double(), torch.sub)
    diff = covered_both.double().mean() - covered_one.double().mean()
    assert 0.4 < lo < diff < hi < 0.6


def test_paired_bootstrap_interval():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(400, generator=g)
    assert paired_bootstrap(a, a, torch.sub) == pytest.approx((0.0, 0.0))  # paired: no spread
    assert paired_bootstrap(a, a, torch.div) == pytest.approx((1.0, 1.0))
    noisy = a + 0.1 + 0.05 * torch.randn(400, generator=g)
    lo90, hi90 = paired_bootstrap(noisy, a, torch.sub, confidence=0.9)
    lo99, hi99 = paired_bootstrap(noisy, a, torch.sub, confidence=0.99)
    assert lo99 < lo90 < 0.1 < hi90 < hi99 and hi90 - lo90 < 0.02  # the pairing removes a's spread
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap(a, a[:3], torch.sub)


def test_coverage_metrics_see_a_mode_collapsed_selection_of_real_digits(classifier, train_real):
    """Real held-out digits scored as if generated, 10 per digit: a random draw vs the 10
    nearest (in feature space) to one sample of each digit, a mode-collapsed draw of the same
    size. Both read as the right digit and look real (precision); the collapsed draw covers less
    of the real digits (recall) and varies less within a prompt (diversity)."""
    real, labels = held_out_images()
    feats = classifier_features(classifier, real)
    g = torch.Generator().manual_seed(0)
    random_draw, collapsed_draw = [], []
    for d in range(10):
        idx = torch.nonzero(labels == d).flatten()
        random_draw.append(idx[torch.randperm(len(idx), generator=g)[:10]])
        nearest = (feats[idx] - feats[idx[0]]).norm(dim=1).argsort()[:10]
        collapsed_draw.append(idx[nearest])
    honest, collapsed = (
        score_digits(RenderedDigits(real[sel], labels[sel]), 32, 0.0, classifier, train_real)
        for sel in (torch.cat(random_draw), torch.cat(collapsed_draw)))
    assert honest.accuracy > 0.9 and collapsed.accuracy > 0.9
    assert honest.precision > 0.7 and collapsed.precision > 0.7
    assert honest.recall > 0.85  # measured 0.95; collapsed 0.75
    assert collapsed.recall < honest.recall - 0.1
    assert collapsed.diversity < 0.85 * honest.diversity  # measured 28.3 vs 37.0
    assert collapsed.fd > honest.fd


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
    assert torch.isfinite(torch.tensor([result.fd, result.accuracy, result.diversity])).all()
    assert 0 <= result.precision <= 1 and 0 <= result.recall <= 1
    assert 0 <= result.accuracy <= 1 and len(result.per_digit_accuracy) == 10
    # Each image has its own seeded generator: batching does not change the samples.
    a = render_digits(pipe, 1, 1, 3.0, seed=5, batch_size=10)
    b = render_digits(pipe, 1, 1, 3.0, seed=5, batch_size=3)
    assert torch.allclose(a.images, b.images, atol=1e-5)
    assert a.labels.tolist() == list(range(10))
    save_grid(a.images, tmp_path / "grid.png", columns=5, gutter=1)
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (5 * 33 + 1, 2 * 33 + 1)
