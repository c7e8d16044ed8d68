"""Plugins trained for the digits *teacher*, as users train them for a base model, in the files
users load: a style LoRA and a silhouette ControlNet (issue #14, `scripts/bench_plugins.py`).

Both use the teacher's own objective and loop (`builder.fit_epsilon`: epsilon prediction on
SDXL's schedule, 10 % prompt dropout, EMA) on the training split of the digits:

- style LoRA: a peft LoRA on the LCM-LoRA target set (`distill.lora.lora_target_modules`)
  fitted to *bold* digits (`plugins.dilate`) captioned "a bold handwritten digit seven";
  saved with `StableDiffusionXLPipeline.save_lora_weights` (diffusers' peft layout), so
  `pipe.load_lora_weights(folder)` loads it unchanged.
- silhouette ControlNet: `ControlNetModel.from_unet(teacher_unet)` conditioned on a digit's
  coarse silhouette (`plugins.silhouette_image`), the UNet frozen; its conditioning embedding
  downsamples by the VAE's factor (4 here, SDXL's 8: one stride-2 block per halving), so its
  features land on the latent grid; saved with `save_pretrained`.

Each is cached under `<root>/<kind>-<hash of base model and spec>/` and built at most once
(`ensure_style_lora`, `ensure_silhouette_controlnet`); `plugin.json` holds what was trained.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from train.digits.builder import (
    EpsilonData,
    EpsilonFit,
    NoisedBatch,
    encode_latents,
    fit_epsilon,
    unet_eps,
)
from train.digits.data import (
    digits_images,
    digits_split,
    prompt_for,
    read_model_info,
    to_model_range,
)
from train.digits.plugins import dilate, silhouette, silhouette_image, styled_prompt_for
from train.files import build_once

PLUGIN_INFO = "plugin.json"  # written last: a cached plugin folder is complete when it exists
STYLE_LORA_DIR = "style_lora"  # holds diffusers' `pytorch_lora_weights.safetensors`
CONTROLNET_DIR = "controlnet"  # a `save_pretrained` folder
# diffusers' default conditioning-embedding widths (SDXL: 3 stride-2 blocks for its factor 8);
# a smaller factor keeps the first log2(factor) + 1 of them.
CONDITIONING_WIDTHS = (16, 32, 96, 256)


@dataclass(frozen=True)
class StyleLoraSpec:
    rank: int = 8  # LoRA rank; alpha = rank, so the file's strength needs no alpha convention
    dilation_px: int = 1  # bold = strokes 2·dilation_px pixels wider
    steps: int = 800  # optimizer steps
    lr: float = 1e-3  # peak of the one-cycle schedule
    batch_size: int = 32  # images per step
    seed: int = 0

    def __post_init__(self):
        if self.rank < 1 or self.dilation_px < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"style LoRA: rank, dilation_px, steps and batch_size must be >= 1, got {self}")


@dataclass(frozen=True)
class ControlNetSpec:
    cell_px: int = 4  # silhouette cell in pixels (4 = one latent pixel of the digits VAE)
    steps: int = 1000  # optimizer steps
    lr: float = 1e-3  # peak of the one-cycle schedule
    batch_size: int = 32  # images per step
    seed: int = 0

    def __post_init__(self):
        if self.cell_px < 1 or self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"ControlNet: cell_px, steps and batch_size must be >= 1, got {self}")


@dataclass(frozen=True)
class PluginReport:
    kind: str  # "style_lora" or "controlnet"
    base: str  # the base model folder's name (its size, seed and version)
    spec: dict
    final_loss: float  # smoothed epsilon MSE at the end of training
    seconds: float


# ----------------------------------------------------------------------------- training data


def _teacher_pipeline(base_dir: Path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(base_dir), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _epsilon_data(pipe, images_uint8: torch.Tensor, labels: torch.Tensor, prompts: list[str]) -> EpsilonData:
    """Latents of `images_uint8` under the teacher's VAE, and the teacher's embeddings of the
    ten class `prompts` (index = label)."""
    mean, std = encode_latents(pipe.vae, to_model_range(images_uint8))
    with torch.no_grad():
        text, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    return EpsilonData(mean, std, labels, text, pooled)


def _training_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and labels of the training split (the held-out digits stay unseen)."""
    data, idx = digits_images(), torch.from_numpy(digits_split().train)
    return data.images[idx], data.labels[idx]


# ----------------------------------------------------------------------------- style LoRA


def fit_style_lora(pipe, spec: StyleLoraSpec) -> EpsilonFit:
    """Fit a LoRA on the teacher pipeline's UNet (in place; `fit.model` is its EMA copy) to
    bold digits and their styled captions."""
    from distill.lora import add_lora

    images, labels = _training_digits()
    data = _epsilon_data(pipe, dilate(images, spec.dilation_px), labels,
                         [styled_prompt_for(d) for d in range(10)])
    add_lora(pipe.unet, spec.rank, float(spec.rank))  # base frozen, only lora_A / lora_B train
    return fit_epsilon(pipe.unet, unet_eps, data, spec.steps, spec.lr, spec.batch_size, spec.seed,
                       desc="style LoRA")


def save_style_lora(unet, folder: Path) -> None:
    """The UNet's peft adapter as diffusers' `pytorch_lora_weights.safetensors` in `folder`,
    with its LoraConfig (rank, alpha, targets) as the file's adapter metadata."""
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())


def train_style_lora(base_dir: Path, spec: StyleLoraSpec, out_dir: Path) -> PluginReport:
    """The style LoRA of the teacher at `base_dir`, written to `out_dir/style_lora/`."""
    start = time.time()
    fit = fit_style_lora(_teacher_pipeline(base_dir), spec)
    save_style_lora(fit.model, out_dir / STYLE_LORA_DIR)
    return _report("style_lora", base_dir, spec, fit.final_loss, start)


# ----------------------------------------------------------------------------- ControlNet


def conditioning_widths(vae_factor: int) -> tuple[int, ...]:
    """ControlNet conditioning-embedding widths whose stride-2 blocks downsample by exactly
    `vae_factor` pixels per latent (diffusers' default widths, one block per halving)."""
    halvings = round(math.log2(vae_factor))
    if 2 ** halvings != vae_factor or not 0 <= halvings < len(CONDITIONING_WIDTHS):
        raise ValueError(f"VAE factor {vae_factor} is not a power of 2 up to {2 ** (len(CONDITIONING_WIDTHS) - 1)}")
    return CONDITIONING_WIDTHS[: halvings + 1]


def controlnet_eps(unet, controls: torch.Tensor):
    """predict_eps for `fit_epsilon`: the ControlNet's residuals of the batch's images'
    `controls` added to the frozen UNet (as the ControlNet pipelines add them)."""
    def predict(controlnet, batch: NoisedBatch) -> torch.Tensor:
        cond = {"text_embeds": batch.pooled, "time_ids": batch.time_ids}
        down, mid = controlnet(batch.x_t, batch.t, batch.text, controlnet_cond=controls[batch.index],
                               added_cond_kwargs=cond, return_dict=False)
        return unet(batch.x_t, batch.t, batch.text, added_cond_kwargs=cond,
                    down_block_additional_residuals=down, mid_block_additional_residual=mid).sample

    return predict


def train_silhouette_controlnet(base_dir: Path, spec: ControlNetSpec, out_dir: Path) -> PluginReport:
    """Fit a ControlNet, initialised from the teacher UNet, to generate the digit whose coarse
    silhouette it is given; write `out_dir/controlnet/` (save_pretrained)."""
    from diffusers import ControlNetModel

    from train.embedded import vae_scale_factor

    start = time.time()
    pipe = _teacher_pipeline(base_dir)
    images, labels = _training_digits()
    data = _epsilon_data(pipe, images, labels, [prompt_for(d) for d in range(10)])
    controls = silhouette_image(silhouette(images.float() / 255, spec.cell_px), spec.cell_px)
    unet = pipe.unet.requires_grad_(False).eval()
    torch.manual_seed(spec.seed)  # the conditioning embedding's random init
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=conditioning_widths(vae_scale_factor(base_dir)))
    fit = fit_epsilon(controlnet, controlnet_eps(unet, controls), data, spec.steps, spec.lr,
                      spec.batch_size, spec.seed, desc="ControlNet")
    fit.model.save_pretrained(out_dir / CONTROLNET_DIR)
    return _report("controlnet", base_dir, spec, fit.final_loss, start)


# ----------------------------------------------------------------------------- the cache


def _report(kind: str, base_dir: Path, spec, final_loss: float, start: float) -> PluginReport:
    return PluginReport(kind, Path(base_dir).name, asdict(spec), final_loss, round(time.time() - start, 1))


def plugin_dir_for(kind: str, base_dir: Path, spec, root: Path) -> Path:
    """`<root>/<kind>-<hash>`: the hash covers the base model (its folder name and info file)
    and every spec field, so a changed spec or base trains anew."""
    key = json.dumps({"kind": kind, "base": Path(base_dir).name, "info": read_model_info(base_dir),
                      "spec": asdict(spec)}, sort_keys=True)
    return Path(root) / f"{kind.replace('_', '-')}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def _ensure(kind: str, train, base_dir: Path, spec, root: Path) -> Path:
    def build(tmp: Path) -> None:
        report = train(Path(base_dir), spec, tmp)
        (tmp / PLUGIN_INFO).write_text(json.dumps(asdict(report), indent=2) + "\n")

    return build_once(plugin_dir_for(kind, base_dir, spec, root), PLUGIN_INFO, build)


def ensure_style_lora(base_dir: str | os.PathLike, spec: StyleLoraSpec, root: str | os.PathLike) -> Path:
    """The cached style-LoRA folder for the base (trained first if missing); load it with
    `pipe.load_lora_weights(folder / STYLE_LORA_DIR)`."""
    return _ensure("style_lora", train_style_lora, Path(base_dir), spec, Path(root)) / STYLE_LORA_DIR


def ensure_silhouette_controlnet(base_dir: str | os.PathLike, spec: ControlNetSpec,
                                 root: str | os.PathLike) -> Path:
    """The cached ControlNet folder for the base (trained first if missing); load it with
    `ControlNetModel.from_pretrained(folder)`."""
    return _ensure("controlnet", train_silhouette_controlnet, Path(base_dir), spec, Path(root)) / CONTROLNET_DIR
