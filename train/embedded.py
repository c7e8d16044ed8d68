"""The config's embedded-model resolver: what `model.base` names, and what an embedded base brings.

`model.base` is a diffusers folder, or an embedded model the project builds itself on first
use (`digits:full`, `digits:tiny`: `train/digits/`). An embedded base also brings its default
training shards, its validation prompts and an evaluator for its exports; a folder brings
none of these, so the config must name them. This module is the only generic code that
imports `train.digits`.
"""

from __future__ import annotations

import os
from pathlib import Path

from train.config import ConfigError, DataConfig, ModelConfig, ValidationConfig
from train.files import default_cache_root

EMBEDDED_PREFIX = "digits:"
EVAL_METRICS = ("digits_fd", "prompt_accuracy")  # `evaluate_export`'s keys: FID and CLIP-score analogues


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
    """The base model's diffusers folder; the embedded digits model is built on first use."""
    if is_embedded(model_cfg):
        size = model_cfg.base.split(":", 1)[1]
        return Path(_digits().ensure_digits_model(cache_root(model_cfg), size))
    path = Path(model_cfg.base)
    if not (path / "unet" / "config.json").is_file():
        raise FileNotFoundError(
            f"model.base: {path} is not a diffusers model folder (no unet/config.json). Nothing is "
            "downloaded at run time: point it at a local copy (e.g. `huggingface-cli download "
            "stabilityai/stable-diffusion-xl-base-1.0 --local-dir ...`), or use digits:full.")
    return path


def resolve_train_shards(model_cfg: ModelConfig, data_cfg: DataConfig) -> str:
    """data.train_shards, else (no latent shards either) the embedded model's own shards."""
    if data_cfg.train_shards or data_cfg.latent_shards:
        return data_cfg.train_shards
    if not is_embedded(model_cfg):
        raise ValueError("data.train_shards: required unless model.base is an embedded digits model")
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
                    per_digit: int) -> dict[str, float]:
    """EVAL_METRICS of an export of a run on an embedded base: rendered through the diffusers
    pipeline at the export's own step count, guidance off, scored by the embedded evaluator."""
    if not is_embedded(model_cfg):
        raise ValueError(f"model.base: {model_cfg.base} is not an embedded model; only exports of "
                         "digits:* runs can be evaluated (the evaluator knows only the digits)")
    result = _digits().evaluate_export(resolve_base(model_cfg), export, per_digit,
                                       cache_root=cache_root(model_cfg))
    return {"digits_fd": result.fd, "prompt_accuracy": result.accuracy}
