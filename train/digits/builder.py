"""The embedded default teacher: a tiny but real SDXL-format text-to-image model of digits.

No SDXL weights can be downloaded here, so this builder trains one from scratch on
scikit-learn's handwritten digits (`sklearn.datasets.load_digits`, 1,797 8×8 images shipped
inside scikit-learn), upsampled to 32×32 RGB (ARCHITECTURE.md, "Embedded default"):

- two CLIP tokenizers whose byte-level BPE vocabulary is generated locally and two
  random-init CLIP text encoders (SDXL freezes them, the UNet learns to read them), from
  `train/digits/text.py`;
- an `AutoencoderKL` (32×32×3 ↔ 4×8×8) trained on the digits;
- an SDXL-style `UNet2DConditionModel` (`addition_embed_type="text_time"`) trained as an
  epsilon-prediction DDPM on SDXL's scaled-linear schedule with 10 % prompt dropout to
  all-zero embeddings (SDXL's `force_zeros_for_empty_prompt`), so CFG works;
- an `EulerDiscreteScheduler` config with SDXL's betas;

saved as a diffusers folder that `StableDiffusionXLPipeline.from_pretrained(DIR)` loads
offline, plus `digits_model.json` (size, guidance scale, resolution, metrics).

Launch: `python scripts/make_digits_model.py --out DIR [--size tiny|full] [--seed N]`.
The data, split and prompts are `train/digits/data.py`'s; the guidance scale is chosen with the
evaluator of `train/digits/metrics.py` on the training digits (the held-out ones stay unseen).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from distill.schedule import SDXL_SCHEDULER_CONFIG
from train.digits.data import (
    DIGIT_PROMPTS,
    INFO_FILE,
    RESOLUTION,
    TIME_IDS,
    DigitsSplit,
    digits_images,
    digits_split,
    to_model_range,
)
from train.digits.metrics import ensure_digits_classifier, evaluate_pipeline
from train.digits.text import build_text_encoders, write_tokenizer
from train.files import build_once, default_cache_root

MODEL_VERSION = 1  # bump when the builder changes, so caches rebuild
MIN_SCHEDULE_STEPS = 21  # the shortest one-cycle schedule of `fit_epsilon`


# ----------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class DigitsModelSpec:
    """Widths and training budgets of one model variant (all widths multiples of 32)."""

    text_hidden: int  # hidden size of each CLIP encoder; cross-attention dim is twice this
    text_layers: int
    projection_dim: int  # encoder 2's pooled projection = the UNet's `text_embeds` size
    vae_channels: tuple[int, int, int]
    vae_groups: int  # GroupNorm groups in the VAE (its widths need not be multiples of 32)
    unet_channels: tuple[int, ...]
    unet_head_dims: tuple[int, ...]  # diffusers' `attention_head_dim` (number of heads)
    time_embed_dim: int  # SDXL `addition_time_embed_dim` per time_ids entry
    vae_steps: int
    vae_lr: float
    vae_batch_size: int
    unet_steps: int
    unet_lr: float
    batch_size: int  # UNet training batch
    guidance_candidates: tuple[float, ...]  # CFG scales tried; empty keeps the first default
    eval_per_digit: int  # samples per digit when choosing the guidance scale


SPECS = {
    "full": DigitsModelSpec(
        text_hidden=32, text_layers=2, projection_dim=32, vae_channels=(16, 32, 32),
        vae_groups=8, unet_channels=(32, 64, 64), unet_head_dims=(2, 4, 4), time_embed_dim=16,
        vae_steps=400, vae_lr=2e-3, vae_batch_size=32, unet_steps=1500, unet_lr=1e-3,
        batch_size=128,
        guidance_candidates=(2.0, 3.0, 4.0, 5.0, 6.0), eval_per_digit=20),
    "tiny": DigitsModelSpec(
        text_hidden=32, text_layers=1, projection_dim=16, vae_channels=(8, 16, 32),
        vae_groups=8, unet_channels=(32, 32), unet_head_dims=(2, 2), time_embed_dim=8,
        vae_steps=15, vae_lr=2e-3, vae_batch_size=16, unet_steps=30, unet_lr=1e-3,
        batch_size=32,
        guidance_candidates=(), eval_per_digit=0),
}
DEFAULT_GUIDANCE = 4.0


# ----------------------------------------------------------------------------- VAE


@dataclass(frozen=True)
class VaeReport:
    recon_mse: float  # held-out reconstruction MSE in [0, 1] pixel units
    recon_psnr: float  # dB, held-out, [0, 1] pixel range
    scaling_factor: float  # 1 / std of the training latents


@dataclass(frozen=True)
class TrainedVae:
    vae: object  # diffusers AutoencoderKL, eval mode, frozen, `scaling_factor` set
    report: VaeReport
    latent_mean: torch.Tensor  # scaled posterior mean of each training image
    latent_std: torch.Tensor  # scaled posterior std


def train_vae(spec: DigitsModelSpec, train_x: torch.Tensor, eval_x: torch.Tensor,
              seed: int) -> TrainedVae:
    """Fit an `AutoencoderKL` (3 blocks: 32×32×3 → 4×8×8) with L2 recon + a small KL term."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(spec.vae_channels)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n,
                        block_out_channels=spec.vae_channels, layers_per_block=1,
                        norm_num_groups=spec.vae_groups, sample_size=RESOLUTION)
    opt = torch.optim.AdamW(vae.parameters(), lr=spec.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, spec.vae_lr, total_steps=spec.vae_steps,
                                                pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    vae.train()
    for _ in tqdm(range(spec.vae_steps), desc="VAE", leave=False):
        x = train_x[torch.randint(len(train_x), (spec.vae_batch_size,), generator=g)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
        recon = vae.decode(z).sample
        # The KL weight keeps latents near N(0, I) so 1/std is a meaningful scale.
        loss = F.mse_loss(recon, x) + 1e-4 * post.kl().mean() / z[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        recon = vae.decode(vae.encode(eval_x).latent_dist.mode()).sample.clamp(-1, 1)
        mse = F.mse_loss((recon + 1) / 2, (eval_x + 1) / 2).item()
    mean, std = encode_latents(vae, train_x, scaling_factor=1.0)
    scale = 1.0 / mean.std().item()
    vae.register_to_config(scaling_factor=scale)
    return TrainedVae(vae, VaeReport(mse, 10 * math.log10(1.0 / mse), scale), mean * scale,
                      std * scale)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, scaling_factor: float | None = None,
                   batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled posterior (mean, std) of [−1, 1] images, the per-image latents UNet training
    samples from; scaling_factor defaults to the VAE's own."""
    scale = vae.config.scaling_factor if scaling_factor is None else scaling_factor
    posts = [vae.encode(b).latent_dist for b in images.split(batch_size)]
    return torch.cat([p.mean for p in posts]) * scale, torch.cat([p.std for p in posts]) * scale


# ----------------------------------------------------------------------------- UNet


def build_unet(spec: DigitsModelSpec, cross_attention_dim: int, seed: int):
    """An SDXL-style UNet for 4×8×8 latents: text_time added conditioning, cross-attention
    in every block but the first (as SDXL), linear projections."""
    from diffusers import UNet2DConditionModel

    n = len(spec.unet_channels)
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 4, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        block_out_channels=spec.unet_channels, layers_per_block=1,
        transformer_layers_per_block=1, attention_head_dim=spec.unet_head_dims,
        norm_num_groups=32, cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time", addition_time_embed_dim=spec.time_embed_dim,
        # SDXL: pooled text embedding ‖ 6 sinusoidal time_ids embeddings.
        projection_class_embeddings_input_dim=spec.projection_dim + 6 * spec.time_embed_dim,
        use_linear_projection=True)


@torch.no_grad()
def _ema_update(ema, model, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


@dataclass(frozen=True)
class NoisedBatch:
    """One training batch of the epsilon objective: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·eps (DDPM eq. 4)."""

    index: torch.Tensor  # (B,) rows of the training latents drawn (to look up per-image inputs)
    x_t: torch.Tensor  # (B, 4, h, w) noised latents
    t: torch.Tensor  # (B,) integer timesteps in [0, 1000)
    eps: torch.Tensor  # (B, 4, h, w) the noise to predict
    text: torch.Tensor  # (B, tokens, dim) prompt embeddings, zero where the prompt was dropped
    pooled: torch.Tensor  # (B, projection_dim) pooled embeddings, zero where dropped
    time_ids: torch.Tensor  # (B, 6) SDXL micro-conditioning


@dataclass(frozen=True)
class EpsilonData:
    """What the epsilon objective draws from: per-image latents and labels, per-class prompts."""

    latent_mean: torch.Tensor  # (N, 4, h, w) scaled posterior mean of each training image
    latent_std: torch.Tensor  # (N, 4, h, w) scaled posterior std
    labels: torch.Tensor  # (N,) the prompt class of each image
    prompt_embeds: torch.Tensor  # (classes, tokens, dim) from the pipeline's `encode_prompt`
    pooled_embeds: torch.Tensor  # (classes, projection_dim)


@dataclass(frozen=True)
class EpsilonFit:
    model: torch.nn.Module  # the EMA of the trained module, eval mode
    final_loss: float  # smoothed epsilon MSE at the end of training


def unet_eps(unet, batch: NoisedBatch) -> torch.Tensor:
    """The plain UNet's epsilon prediction of a batch."""
    return unet(batch.x_t, batch.t, batch.text,
                added_cond_kwargs={"text_embeds": batch.pooled, "time_ids": batch.time_ids}).sample


def fit_epsilon(model: torch.nn.Module, predict_eps: Callable[[torch.nn.Module, NoisedBatch], torch.Tensor],
                data: EpsilonData, steps: int, lr: float, batch_size: int, seed: int,
                prompt_dropout: float = 0.1, desc: str = "UNet") -> EpsilonFit:
    """Epsilon-prediction DDPM training on SDXL's schedule of `model`'s trainable parameters
    (those with requires_grad): the teacher's own training, and that of plugins on it.

    predict_eps(model, batch): the prediction the loss compares with batch.eps; it may run
    frozen modules around `model` (a ControlNet feeds the frozen UNet). A fresh latent is
    sampled from each image's posterior every step, as SD trains. A dropped prompt is all-zero
    embeddings, exactly the pipeline's unconditional branch under `force_zeros_for_empty_prompt`,
    so CFG works with what is trained here.
    """
    from diffusers import DDPMScheduler

    abar = DDPMScheduler(**SDXL_SCHEDULER_CONFIG).alphas_cumprod
    ema = copy.deepcopy(model).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # OneCycleLR divides by its warm-up length (0.05·T − 1 steps), so it needs T > 20: shorter
    # runs (plugins in tests) take the first `steps` of a 21-step schedule.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, MIN_SCHEDULE_STEPS),
                                                pct_start=0.05)
    g = torch.Generator().manual_seed(seed + 1)
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32).repeat(batch_size, 1)
    model.train()
    smoothed = float("nan")
    bar = tqdm(range(steps), desc=desc, leave=False)
    for step in bar:
        idx = torch.randint(len(data.labels), (batch_size,), generator=g)
        mean, std = data.latent_mean[idx], data.latent_std[idx]
        x0 = mean + std * torch.randn(mean.shape, generator=g)
        eps = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, len(abar), (batch_size,), generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        keep = (torch.rand(batch_size, generator=g) >= prompt_dropout).float()
        text = data.prompt_embeds[data.labels[idx]] * keep.view(-1, 1, 1)
        pooled = data.pooled_embeds[data.labels[idx]] * keep.view(-1, 1)
        loss = F.mse_loss(predict_eps(model, NoisedBatch(idx, x_t, t, eps, text, pooled, time_ids)), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        _ema_update(ema, model, min(0.998, (1 + step) / (10 + step)))
        smoothed = loss.item() if math.isnan(smoothed) else 0.98 * smoothed + 0.02 * loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{smoothed:.4f}")
    return EpsilonFit(ema.eval(), smoothed)


def train_unet(unet, spec: DigitsModelSpec, data: EpsilonData, seed: int) -> EpsilonFit:
    """The teacher: the whole UNet fitted to the digits with 10 % prompt dropout."""
    return fit_epsilon(unet, unet_eps, data, spec.unet_steps, spec.unet_lr, spec.batch_size, seed)


# ----------------------------------------------------------------------------- assembly


@dataclass(frozen=True)
class DigitsModelReport:
    path: str
    size: str
    seed: int
    build_seconds: float
    unet_params: int
    vae: VaeReport
    unet_final_loss: float  # smoothed epsilon MSE at the end of training
    guidance_scale: float
    # Teacher at 32 trailing Euler steps with `guidance_scale`, vs the held-out digits
    # (None for variants that skip evaluation, e.g. "tiny").
    teacher_accuracy: float | None
    teacher_fd: float | None
    guidance_search: dict[str, dict[str, float]]  # scale → accuracy, FD vs *training* digits


def _choose_guidance(pipe, spec: DigitsModelSpec, split: DigitsSplit, seed: int,
                     cache_root: Path) -> tuple[float, dict]:
    """Pick the CFG scale with the lowest FD against the *training* digits among those with
    near-best prompt accuracy (the held-out split stays untouched for reporting)."""
    classifier = ensure_digits_classifier(cache_root)
    data = digits_images()
    train_real = data.images[torch.from_numpy(split.train)].float() / 255
    search = {}
    for scale in spec.guidance_candidates:
        r = evaluate_pipeline(pipe, 32, spec.eval_per_digit, scale, seed, classifier=classifier,
                              real_images=train_real)
        search[str(scale)] = {"accuracy": r.accuracy, "fd": r.fd}
    best_acc = max(v["accuracy"] for v in search.values())
    ok = {k: v for k, v in search.items() if v["accuracy"] >= best_acc - 0.02}
    return float(min(ok, key=lambda k: ok[k]["fd"])), search


def build_digits_model(out_dir: str | os.PathLike, size: str = "full", seed: int = 0,
                       cache_root: str | os.PathLike | None = None) -> DigitsModelReport:
    """Train and save the digits model as a diffusers SDXL folder at `out_dir`.

    cache_root: where the evaluator's classifier is cached (full size only, for choosing
    the guidance scale); defaults to `default_cache_root()`.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    if size not in SPECS:
        raise ValueError(f"size must be one of {sorted(SPECS)}, got {size!r}")
    spec, out_dir, start = SPECS[size], Path(out_dir), time.time()
    split, data = digits_split(), digits_images()  # model seed ≠ split seed, see SPLIT_SEED
    images = to_model_range(data.images)
    train_idx = torch.from_numpy(split.train)

    words = sorted({w for prompt in DIGIT_PROMPTS for w in prompt.split()})
    tokenizer = write_tokenizer(out_dir / "tokenizer", words)
    tokenizer_2 = write_tokenizer(out_dir / "tokenizer_2", words)
    text_encoder, text_encoder_2 = build_text_encoders(
        tokenizer, spec.text_hidden, spec.text_layers, spec.projection_dim, seed)
    trained = train_vae(spec, images[train_idx], images[torch.from_numpy(split.eval)], seed)
    unet = build_unet(spec, 2 * spec.text_hidden, seed)
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG, prediction_type="epsilon",
                                       timestep_spacing="trailing")
    pipe = StableDiffusionXLPipeline(trained.vae, text_encoder, text_encoder_2, tokenizer,
                                     tokenizer_2, unet, scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    with torch.no_grad():
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            list(DIGIT_PROMPTS), device="cpu", do_classifier_free_guidance=False)
    fit = train_unet(unet, spec, EpsilonData(trained.latent_mean, trained.latent_std,
                                             data.labels[train_idx], prompt_embeds, pooled), seed)
    unet, final_loss = fit.model, fit.final_loss
    pipe.register_modules(unet=unet)
    pipe.set_progress_bar_config(disable=True)

    guidance, search, accuracy, fd = DEFAULT_GUIDANCE, {}, None, None
    if spec.guidance_candidates:
        cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
        guidance, search = _choose_guidance(pipe, spec, split, seed, cache_root)
        final = evaluate_pipeline(pipe, 32, spec.eval_per_digit, guidance, seed + 1,
                                  classifier=ensure_digits_classifier(cache_root))
        accuracy, fd = final.accuracy, final.fd

    pipe.save_pretrained(out_dir, safe_serialization=True)
    report = DigitsModelReport(
        str(out_dir), size, seed, round(time.time() - start, 1),
        sum(p.numel() for p in unet.parameters()), trained.report, final_loss, guidance,
        accuracy, fd, search)
    info = {"version": MODEL_VERSION, "size": size, "seed": seed, "resolution": RESOLUTION,
            "guidance_scale": guidance, "time_ids": list(TIME_IDS),
            "prompts": list(DIGIT_PROMPTS),
            "metrics": {k: v for k, v in asdict(report).items() if k != "path"}}
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return report


def ensure_digits_model(cache_root: str | os.PathLike | None = None, size: str = "full",
                        seed: int = 0) -> Path:
    """The cached model folder, built first if missing.

    Builds into a temporary sibling and renames it into place, so an interrupted build never
    leaves a half model at the final path (and two concurrent builders both end up valid).
    """
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    final = root / f"digits-model-{size}-seed{seed}-v{MODEL_VERSION}"
    return build_once(final, INFO_FILE, lambda tmp: build_digits_model(tmp, size, seed, cache_root=root))
