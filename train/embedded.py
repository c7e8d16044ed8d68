"""The config's embedded-model resolver: what `model.base` names, and what an embedded base brings.

`model.base` is a diffusers folder, or an embedded model the project builds itself on first
use (`digits:full`, `digits:tiny`: `train/digits/`). An embedded base also brings its default
training shards, its validation prompts and an evaluator for its exports; a folder brings
none of these, so the config must name them. This module is the only generic code that
imports `train.digits`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from train.config import ConfigError, DataConfig, ModelConfig, ValidationConfig, embedded_base
from train.errors import UserError
from train.files import default_cache_root

EMBEDDED_PREFIX = "digits:"
# `evaluate_export`'s keys: the FID and CLIP-score analogues, then the coverage metrics
EVAL_METRICS = ("digits_fd", "prompt_accuracy", "precision", "recall", "diversity")


def _digits():
    """The embedded digits package, imported on first use. Deliberately inside a function:
    scikit-learn, scipy and the builder are a heavy dependency only `digits:*` configs need,
    and importing the training loop must not load them (the one project import inside a
    function that generic code makes)."""
    from train import digits

    return digits


def cache_root(model_cfg: ModelConfig) -> Path:
    """model.cache_dir, else the embedded models' default ($DISTILL_CACHE or ~/.cache/...)."""
    return Path(model_cfg.cache_dir) if model_cfg.cache_dir else default_cache_root()


def is_embedded(model_cfg: ModelConfig) -> bool:
    return model_cfg.base.startswith(EMBEDDED_PREFIX)


def resolve_base(model_cfg: ModelConfig) -> Path:
    """The base model's diffusers folder, checked to be SDXL-style; the embedded digits model
    is built on first use."""
    if is_embedded(model_cfg):
        size, seed = embedded_base(model_cfg.base)
        path = Path(_digits().ensure_digits_model(cache_root(model_cfg), size, seed))
    else:
        path = Path(model_cfg.base)
    check_base_layout(path)  # the embedded one too: a damaged cache is named like any folder
    return path


# What an SDXL-style diffusers folder holds: the loaders need each part (transformers would
# otherwise take a missing local subfolder for a Hub repo id: "Repo id must be in the form ...").
SDXL_PARTS = {"unet": "config.json", "vae": "config.json", "text_encoder": "config.json",
              "text_encoder_2": "config.json", "tokenizer": None, "tokenizer_2": None,
              "scheduler": "scheduler_config.json"}
SUPPORTED = "this release supports SDXL-style UNets (two text encoders, text_time embedding)"


def _read_json(path: Path, where: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"model.base: unreadable {path.relative_to(where)} ({err})", where,
                        "restore the base model folder from its source") from None


def check_base_layout(path: Path) -> None:
    """A folder base must be an SDXL-style diffusers folder; say which part is missing or which
    layout it is instead, before any loader sees it."""
    download = ("point model.base at a local copy of an SDXL-style model (e.g. `huggingface-cli "
                "download stabilityai/stable-diffusion-xl-base-1.0 --local-dir DIR`), or use "
                "digits:full; nothing is downloaded at run time")
    if not path.is_dir():
        raise UserError("model.base: no such folder", path, download)
    if not (path / "unet" / "config.json").is_file():
        raise UserError("model.base: not a diffusers model folder (no unet/config.json)", path, download)
    unet = _read_json(path / "unet" / "config.json", path)
    if unet.get("addition_embed_type") != "text_time":
        kind = ("SD1.5-style UNet (no text_time embedding)" if unet.get("addition_embed_type") is None
                else f"UNet with addition_embed_type={unet.get('addition_embed_type')!r}")
        raise UserError(f"model.base: {kind}; {SUPPORTED}", path, download)
    for part, config in SDXL_PARTS.items():
        if not (path / part / (config or "")).exists():
            raise UserError(f"model.base: no {part}/{config or ''} (an SDXL-style folder has "
                            f"{', '.join(SDXL_PARTS)})", path, download)


def vae_scale_factor(path: Path) -> int:
    """Pixels per latent along a side: 2 ** (number of VAE down blocks - 1)."""
    vae = _read_json(Path(path) / "vae" / "config.json", Path(path))
    return 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)


def check_resolution(path: Path, resolution: int) -> None:
    """data.resolution must map to whole latents."""
    factor = vae_scale_factor(path)
    if resolution % factor:
        raise ConfigError(f"data.resolution: {resolution} is not a multiple of the base VAE's "
                          f"downsampling factor {factor}", where=path,
                          todo=f"use a multiple of {factor}, e.g. {max(factor, resolution // factor * factor)}")


def resolve_train_shards(model_cfg: ModelConfig, data_cfg: DataConfig) -> str:
    """data.train_shards, else (no latent shards either) the embedded model's own shards."""
    if data_cfg.train_shards or data_cfg.latent_shards:
        return data_cfg.train_shards
    if not is_embedded(model_cfg):
        raise ConfigError("data.train_shards: required unless model.base is an embedded digits model")
    urls = _digits().ensure_digits_shards(cache_root(model_cfg)).train_urls
    return urls if isinstance(urls, str) else " ".join(urls)


def validation_prompts(model_cfg: ModelConfig, validation_cfg: ValidationConfig) -> list[str]:
    """validation.prompts, else the embedded model's prompts (the digits zero..nine)."""
    if validation_cfg.prompts:
        return list(validation_cfg.prompts)
    if not is_embedded(model_cfg):
        raise ConfigError(f"validation.prompts: required unless model.base is an embedded digits "
                          f"model; {model_cfg.base} brings no prompts of its own")
    return list(_digits().DIGIT_PROMPTS)


def evaluate_export(model_cfg: ModelConfig, export: str | os.PathLike,
                    per_digit: int, device: str = "cpu") -> dict[str, float]:
    """EVAL_METRICS of an export of a run on an embedded base: rendered through the diffusers
    pipeline at the export's own step count, guidance off, scored by the embedded evaluator."""
    if not is_embedded(model_cfg):
        raise UserError(f"model.base: {model_cfg.base} is not an embedded model", "--eval",
                        "only exports of digits:* runs can be evaluated (the evaluator knows only the digits)")
    result = _digits().evaluate_export(resolve_base(model_cfg), export, per_digit,
                                       cache_root=cache_root(model_cfg), device=device)
    return {"digits_fd": result.fd, "prompt_accuracy": result.accuracy,
            "precision": result.precision, "recall": result.recall, "diversity": result.diversity}
