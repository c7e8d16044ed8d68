"""train/embedded.py, the config's embedded-model resolver: what an embedded base brings (prompts,
shards, a folder built on first use, an evaluator) and the errors for a folder base that lacks
them. The embedded builds themselves are tested in tests/train/digits/."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.config import ConfigError, DataConfig, ModelConfig, ValidationConfig
from train.digits.builder import ensure_digits_model
from train.digits.data import DIGIT_PROMPTS
from train.digits.shards import ensure_digits_shards
from train.embedded import (
    cache_root,
    evaluate_export,
    is_embedded,
    resolve_base,
    resolve_train_shards,
    validation_prompts,
)
from train.errors import UserError

FOLDER = ModelConfig(base="/models/sdxl-base")


def test_validation_prompts_come_from_the_config_else_the_embedded_model():
    tiny = ModelConfig(base="digits:tiny")
    assert validation_prompts(tiny, ValidationConfig(prompts=["a cat"])) == ["a cat"]
    assert validation_prompts(FOLDER, ValidationConfig(prompts=["a cat"])) == ["a cat"]
    assert validation_prompts(tiny, ValidationConfig()) == list(DIGIT_PROMPTS)
    with pytest.raises(ConfigError, match="validation.prompts: required unless model.base is an embedded"):
        validation_prompts(FOLDER, ValidationConfig())


def test_embedded_bases_resolve_into_the_cache(digits_cache):
    tiny = ModelConfig(base="digits:tiny", cache_dir=str(digits_cache))
    assert is_embedded(tiny) and not is_embedded(FOLDER)
    assert cache_root(tiny) == Path(digits_cache)
    assert resolve_base(tiny) == Path(ensure_digits_model(digits_cache, "tiny"))
    assert resolve_train_shards(tiny, DataConfig()) == ensure_digits_shards(digits_cache).train_urls
    assert resolve_train_shards(tiny, DataConfig(train_shards="x-{0..1}.tar")) == "x-{0..1}.tar"


def test_an_embedded_base_of_another_seed_is_a_teacher_of_its_own(digits_cache, tmp_path):
    """digits:<size>:seed<N>: the second teacher of issue #13, built into the cache on first use
    beside seed 0's, with everything else an embedded base brings."""
    import json

    from safetensors.torch import load_file

    other = ModelConfig(base="digits:tiny:seed1", cache_dir=str(tmp_path))
    path = resolve_base(other)
    assert path.name.startswith("digits-model-tiny-seed1-") and path.parent == tmp_path
    assert json.loads((path / "digits_model.json").read_text())["seed"] == 1
    assert resolve_base(other) == path  # built once
    seed0 = resolve_base(ModelConfig(base="digits:tiny", cache_dir=str(digits_cache)))
    w0 = load_file(seed0 / "unet" / "diffusion_pytorch_model.safetensors")
    w1 = load_file(path / "unet" / "diffusion_pytorch_model.safetensors")
    assert w0.keys() == w1.keys() and any(not w0[k].equal(w1[k]) for k in w0)  # another model
    assert validation_prompts(other, ValidationConfig()) == list(DIGIT_PROMPTS)
    assert resolve_train_shards(other, DataConfig()) == ensure_digits_shards(tmp_path).train_urls


def test_a_folder_base_brings_nothing(tmp_path):
    with pytest.raises(UserError, match="not a diffusers model folder"):
        resolve_base(ModelConfig(base=str(tmp_path)))
    with pytest.raises(UserError, match="no such folder"):
        resolve_base(ModelConfig(base=str(tmp_path / "missing")))
    with pytest.raises(UserError, match="data.train_shards: required"):
        resolve_train_shards(FOLDER, DataConfig())
    assert resolve_train_shards(FOLDER, DataConfig(latent_shards="l-{0..1}.tar")) == ""
    with pytest.raises(UserError, match="only exports of digits:\\* runs can be evaluated"):
        evaluate_export(FOLDER, tmp_path / "x.safetensors", per_digit=1)
