"""Quality metrics in the digits domain: the FID and CLIP-score analogues of METHOD.md §7.

A small CNN classifier trained (seeded, cached) on the training split of the digits gives
- `digits_fd`: the Fréchet distance between its penultimate features of two image sets
  (FID's formula, on a feature space that knows what digits look like), and
- `prompt_accuracy`: how often it reads the digit the prompt asked for, and
- the coverage metrics of METHOD.md's mode-coverage claim: `precision_recall` (Kynkäänniemi
  et al. 2019: k-NN manifolds in the same feature space) and `within_prompt_diversity` (mean
  pairwise feature distance among the images of one digit), which mode collapse lowers while
  FD and accuracy can stay good.
`evaluate_pipeline` renders prompts through an unmodified diffusers pipeline (the code path
users run) and scores them against the held-out digits, which no model ever trains on;
`evaluate_export` does so for an export at its own step count, guidance off (the sweep's --eval).
The command line is `train/digits/evaluate.py`.
Images everywhere here are float tensors in [0, 1], shape (N, 3, 32, 32).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from train.digits.data import digits_images, digits_split, prompt_for
from train.export import read_export_info
from train.files import atomic_file, default_cache_root
from train.pipeline import load_pipeline

CLASSIFIER_VERSION = 2  # bump when the classifier changes, so caches retrain


class DigitClassifier(nn.Module):
    """Three conv stages (32 → 16 → 8 → 4 px), a 64-d feature layer, then the logits."""

    feature_dim = 64

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 4 * 4, self.feature_dim))
        # Features are taken before this ReLU: no dead (constant-zero) dimensions, so the
        # feature covariance stays full rank for the Fréchet distance.
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(self.feature_dim, 10))

    def features(self, images: Tensor) -> Tensor:
        """Penultimate features of [0, 1] images: the space `digits_fd` measures in."""
        return self.body(images * 2 - 1)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def _shift(x: Tensor, g: torch.Generator, max_px: int = 2) -> Tensor:
    """Random translation by up to `max_px` (zero fill): cheap robustness to off-centre samples."""
    dy, dx = torch.randint(-max_px, max_px + 1, (2,), generator=g).tolist()
    x = F.pad(x, (max_px,) * 4)
    h, w = x.shape[-2] - 2 * max_px, x.shape[-1] - 2 * max_px
    return x[..., max_px + dy: max_px + dy + h, max_px + dx: max_px + dx + w]


def train_digits_classifier(seed: int = 0, epochs: int = 10, batch_size: int = 64) -> DigitClassifier:
    """Fit the classifier on the training split only (held-out digits stay unseen)."""
    data, split = digits_images(), digits_split()
    x = data.images[torch.from_numpy(split.train)].float() / 255
    y = data.labels[torch.from_numpy(split.train)]
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps = epochs * -(-len(x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(epochs), desc="digit classifier", leave=False):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = F.cross_entropy(model(_shift(x[idx], g)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval().requires_grad_(False)


def ensure_digits_classifier(cache_root: str | os.PathLike | None = None,
                             seed: int = 0) -> DigitClassifier:
    """The cached classifier (safetensors next to the model cache), trained first if missing."""
    from safetensors.torch import load_file, save_file

    root = Path(cache_root) if cache_root is not None else default_cache_root()
    path = root / f"digits-classifier-seed{seed}-v{CLASSIFIER_VERSION}.safetensors"
    if not path.exists():
        model = train_digits_classifier(seed)
        with atomic_file(path) as tmp:  # readers never see a torn file
            save_file(model.state_dict(), str(tmp))
    model = DigitClassifier()
    model.load_state_dict(load_file(path))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def classifier_features(classifier: DigitClassifier, images: Tensor,
                        batch_size: int = 512) -> Tensor:
    return torch.cat([classifier.features(b.float()) for b in images.split(batch_size)])


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^½), FID's formula, in float64."""
    from scipy import linalg

    a, b = feats_a.double().numpy(), feats_b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # singular product: regularise as pytorch-fid does
        off = np.eye(len(cov_a)) * 1e-6
        covmean = linalg.sqrtm((cov_a + off) @ (cov_b + off))
    fd = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean.real)
    return float(max(fd, 0.0))


def digits_fd(gen_images: Tensor, real_images: Tensor,
              classifier: DigitClassifier | None = None) -> float:
    """Fréchet distance between two [0, 1] image sets in the classifier's feature space."""
    classifier = classifier if classifier is not None else ensure_digits_classifier()
    return frechet_distance(classifier_features(classifier, gen_images),
                            classifier_features(classifier, real_images))


@torch.no_grad()
def prompt_accuracy(images: Tensor, labels: Tensor,
                    classifier: DigitClassifier | None = None) -> float:
    """Fraction of images the classifier reads as the digit their prompt asked for."""
    classifier = classifier if classifier is not None else ensure_digits_classifier()
    logits = torch.cat([classifier(b.float()) for b in images.split(512)])
    return (logits.argmax(1) == labels.to(logits.device)).float().mean().item()


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float  # fraction of generated samples inside the real manifold (fidelity)
    recall: float  # fraction of real samples inside the generated manifold (coverage)


def knn_radii(feats: Tensor, k: int) -> Tensor:
    """Distance of each row to its k-th nearest other row: the radius of its manifold ball."""
    if len(feats) <= k:
        raise ValueError(f"k-NN manifold with k={k} needs more than {k} samples, got {len(feats)}")
    dist = torch.cdist(feats.double(), feats.double())
    return dist.kthvalue(k + 1, dim=1).values  # k + 1: each row's nearest is itself (0)


def _inside_manifold(queries: Tensor, support: Tensor, radii: Tensor) -> Tensor:
    """For each query: is it inside the ball of at least one support sample?"""
    return (torch.cdist(queries.double(), support.double()) <= radii[None]).any(dim=1)


def precision_recall(gen_feats: Tensor, real_feats: Tensor, k: int = 3) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019, k = 3 as there): each set's
    manifold is the union of balls around its samples reaching the k-th nearest neighbour.
    Precision = generated samples inside the real manifold; recall = real samples inside the
    generated manifold. Mode collapse shows as low recall at high precision."""
    precision = _inside_manifold(gen_feats, real_feats, knn_radii(real_feats, k)).double().mean()
    return PrecisionRecall(precision.item(), real_covered(gen_feats, real_feats, k).double().mean().item())


def real_covered(gen_feats: Tensor, real_feats: Tensor, k: int = 3) -> Tensor:
    """Per real sample: is it inside the generated k-NN manifold? Its mean is the recall; two
    models' vectors over the same real samples compare them paired."""
    return _inside_manifold(real_feats, gen_feats, knn_radii(gen_feats, k))


def per_image_diversity(feats: Tensor, labels: Tensor) -> Tensor:
    """Per image: its mean L2 feature distance to the other images of its prompt (0 for a prompt's
    only image). With the same number of images per prompt, the mean is the within-prompt
    diversity."""
    out = torch.zeros(len(feats), dtype=torch.float64)
    for label in labels.unique():
        mask = labels == label
        group = feats[mask].double()
        if len(group) > 1:  # the zero self-distance is left out of the n - 1 others
            out[mask] = torch.cdist(group, group).sum(1) / (len(group) - 1)
    return out


def within_prompt_diversity(feats: Tensor, labels: Tensor) -> float:
    """Mean over prompts (digits) of the mean pairwise L2 feature distance among the images
    generated for that prompt: how different one prompt's samples are from each other. Report
    it as a ratio to the teacher's on the same prompts and seeds."""
    per_image = per_image_diversity(feats, labels)
    per_prompt = [per_image[labels == label].mean() for label in labels.unique()
                  if (labels == label).sum() > 1]
    if not per_prompt:
        raise ValueError("within-prompt diversity needs at least two images of one prompt")
    return torch.stack(per_prompt).mean().item()


def paired_bootstrap(a: Tensor, b: Tensor, statistic: Callable[[Tensor, Tensor], Tensor],
                     confidence: float = 0.9, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of statistic(mean a, mean b): samples resampled with
    replacement, the same draw for both (paired: sample i is the same prompt and seed, or the
    same real image, in each). `statistic` takes the (draws,) means, e.g. a - b or a / b."""
    if len(a) != len(b) or len(a) == 0:
        raise ValueError(f"a paired bootstrap needs two equally long, non-empty samples, got {len(a)} and {len(b)}")
    idx = torch.randint(len(a), (draws, len(a)), generator=torch.Generator().manual_seed(seed))
    values = statistic(a.double()[idx].mean(1), b.double()[idx].mean(1))
    tail = (1 - confidence) / 2
    lo, hi = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=values.dtype)).tolist()
    return lo, hi


def held_out_images() -> tuple[Tensor, Tensor]:
    """The held-out real digits ([0, 1] floats) and their labels."""
    data, split = digits_images(), digits_split()
    idx = torch.from_numpy(split.eval)
    return data.images[idx].float() / 255, data.labels[idx]


@dataclass(frozen=True)
class RenderedDigits:
    images: Tensor  # (10·per_digit, 3, H, W) in [0, 1], digit-major order
    labels: Tensor  # (10·per_digit,) the digit each prompt asked for


@torch.no_grad()
def render_digits(pipe, num_steps: int, per_digit: int, guidance_scale: float, seed: int = 0,
                  batch_size: int = 250, *, caption: Callable[[int], str] = prompt_for,
                  control_images: Tensor | None = None) -> RenderedDigits:
    """Render `per_digit` images of each digit through `pipe` (prompts batched).

    Each image has its own generator seeded from (seed, index), so results do not depend on
    the batch size, and two pipelines (with and without a plugin) see the same noise.
    caption(digit): the prompt (default "a handwritten digit seven").
    control_images: (10·per_digit, 3, H, W) in [0, 1], one per image in digit-major order,
    passed as the `image` of a ControlNet pipeline.
    """
    labels = torch.arange(10).repeat_interleave(per_digit)
    prompts = [caption(d) for d in labels.tolist()]
    if control_images is not None and len(control_images) != len(prompts):
        raise ValueError(f"{len(control_images)} control images for {len(prompts)} prompts")
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc=f"render {num_steps} steps",
                      leave=False):
        chunk = prompts[start: start + batch_size]
        gens = [torch.Generator().manual_seed(seed * 1_000_003 + start + i)
                for i in range(len(chunk))]
        control = {} if control_images is None else {"image": control_images[start: start + len(chunk)]}
        result = pipe(prompt=chunk, num_inference_steps=num_steps, guidance_scale=guidance_scale,
                      generator=gens, output_type="pt", **control)
        out.append(result.images.float().cpu().clamp(0, 1))
    return RenderedDigits(torch.cat(out), labels)


@dataclass(frozen=True)
class EvalResult:
    num_steps: int
    guidance_scale: float
    num_images: int
    fd: float  # Fréchet distance to the real images (lower is better)
    accuracy: float  # prompt accuracy (higher is better; chance is 0.1)
    per_digit_accuracy: tuple[float, ...]
    precision: float  # k-NN precision against the real images (fidelity, higher is better)
    recall: float  # k-NN recall against the real images (coverage, higher is better)
    diversity: float  # within-prompt diversity (compare as a ratio to the teacher's)


def score_digits(rendered: RenderedDigits, num_steps: int, guidance_scale: float,
                 classifier: DigitClassifier, real_images: Tensor) -> EvalResult:
    """FD, precision/recall to `real_images`, prompt accuracy and within-prompt diversity of
    already rendered digits (one feature pass each for the generated and the real images)."""
    return score_features(classifier_features(classifier, rendered.images), rendered.labels, num_steps,
                          guidance_scale, classifier, classifier_features(classifier, real_images))


def score_features(gen_feats: Tensor, labels: Tensor, num_steps: int, guidance_scale: float,
                   classifier: DigitClassifier, real_feats: Tensor) -> EvalResult:
    """`score_digits` from the classifier features already computed (a caller that also needs
    the features, or scores many sets against one real set, computes each once)."""
    with torch.no_grad():
        pred = classifier.head(gen_feats).argmax(1)
    hits = (pred == labels).float()
    per_digit_acc = tuple(hits[labels == d].mean().item() for d in range(10))
    pr = precision_recall(gen_feats, real_feats)
    return EvalResult(num_steps, guidance_scale, len(gen_feats),
                      frechet_distance(gen_feats, real_feats), hits.mean().item(), per_digit_acc,
                      pr.precision, pr.recall, within_prompt_diversity(gen_feats, labels))


def evaluate_pipeline(pipe, num_steps: int, per_digit: int = 20, guidance_scale: float = 0.0,
                      seed: int = 0, *, classifier: DigitClassifier | None = None,
                      real_images: Tensor | None = None, batch_size: int = 250,
                      cache_root: str | os.PathLike | None = None) -> EvalResult:
    """Render through `pipe` and score against `real_images` (default: the held-out digits)."""
    classifier = classifier if classifier is not None else ensure_digits_classifier(cache_root)
    real = real_images if real_images is not None else held_out_images()[0]
    pipe.set_progress_bar_config(disable=True)
    rendered = render_digits(pipe, num_steps, per_digit, guidance_scale, seed, batch_size)
    return score_digits(rendered, num_steps, guidance_scale, classifier, real)


def evaluate_export(base_dir: str | os.PathLike, export_path: str | os.PathLike, per_digit: int,
                    seed: int = 0, cache_root: str | os.PathLike | None = None,
                    device: str = "cpu") -> EvalResult:
    """An export applied to its base model as users apply it, rendered at the step count it was
    distilled for with guidance off (distilled students are sampled without CFG, METHOD.md §6)
    and scored against the held-out digits. device: where the pipeline renders ("cuda" on a
    GPU machine; the noise is drawn on the CPU either way, so only kernel rounding differs)."""
    pipe = load_pipeline(base_dir, export_path, device=device)
    steps = read_export_info(export_path).num_inference_steps
    return evaluate_pipeline(pipe, steps, per_digit, guidance_scale=0.0, seed=seed,
                             cache_root=cache_root)
