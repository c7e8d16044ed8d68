"""Issue #16's minimum for SDXL on 24 GB: a LoRA student on the base shares the base's weight
storage (no deep copy), and model.frozen_dtype holds the frozen UNet and text encoders in bf16."""

import pytest
import torch

from distill.lora import add_lora
from distill.student import trainable_parameters
from distill.testing import random_conditioning, tiny_unet
from tests.conftest import ROOT
from train.config import ConfigError, ModelConfig, load_config
from train.models import shared_unet


def test_shared_unet_shares_every_weight_and_training_its_lora_leaves_the_base_alone():
    base = tiny_unet().requires_grad_(False)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    twin = shared_unet(base)
    for (name, a), b in zip(base.state_dict().items(), twin.state_dict().values()):
        assert a.data_ptr() == b.data_ptr(), name
    add_lora(twin, 4, 4.0)
    assert not any("lora_" in n for n, _ in base.named_parameters())
    params = trainable_parameters(twin)
    opt = torch.optim.AdamW(params, lr=1e-2)
    cond = random_conditioning(2)
    for _ in range(2):
        twin(torch.randn(2, 4, 8, 8), torch.tensor([999, 499]), **cond.unet_kwargs()).sample.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_frozen_dtype_auto_follows_mixed_precision_and_half_storage_works_without_it():
    from train.models import Precision

    tiny = ROOT / "configs/tiny.yaml"
    with pytest.raises(ConfigError, match="frozen_dtype"):
        ModelConfig(frozen_dtype="int8")
    cfg = load_config(tiny, ["model.frozen_dtype=bf16"])  # fp32 compute, bf16 storage
    assert Precision.of(cfg.model, cfg.runtime.mixed_precision) == Precision(torch.bfloat16, torch.float32)
    assert Precision.of(cfg.model, "no").layer_compute == torch.float32
    auto = load_config(tiny, ["runtime.mixed_precision=bf16"])
    assert auto.model.frozen_dtype == "auto"
    assert Precision.of(auto.model, "bf16") == Precision(torch.bfloat16, torch.bfloat16)
    assert Precision.of(auto.model, "no") == Precision(torch.float32, torch.float32)


def test_yaml_booleans_are_read_as_the_words_for_string_choices(tmp_path):
    """`no` / `off` unquoted are YAML booleans; for a string choice they mean the word."""
    tiny = ROOT / "configs/tiny.yaml"
    assert load_config(tiny, ["runtime.mixed_precision=no"]).runtime.mixed_precision == "no"
    assert load_config(tiny, ["runtime.mixed_precision=off"]).runtime.mixed_precision == "no"
    text = tiny.read_text() + "\nruntime:\n  mixed_precision: off\n"
    (tmp_path / "c.yaml").write_text(text)
    assert load_config(tmp_path / "c.yaml").runtime.mixed_precision == "no"
    with pytest.raises(ConfigError, match="quote the value"):
        load_config(tiny, ["data.vae_dtype=no"])


def test_load_base_holds_frozen_weights_in_bf16_and_embeddings_stay_fp32(tmp_path):
    from train.models import load_base
    from train.random_sdxl import build_random_sdxl, small_spec

    build_random_sdxl(tmp_path / "m", small_spec(), torch.float32)
    base = load_base(tmp_path / "m", ModelConfig(base=str(tmp_path / "m"), frozen_dtype="bf16"),
                     torch.device("cpu"), torch.float32)
    assert base.unet.dtype == base.text.text_encoder.dtype == base.text.text_encoder_2.dtype == torch.bfloat16
    cond = base.text.conditioning(["a cat"], torch.tensor([[1365.0, 1024, 0, 0, 1365, 1024]]))
    assert cond.prompt_embeds.dtype == cond.pooled_embeds.dtype == cond.time_ids.dtype == torch.float32
    assert cond.time_ids[0, 0] == 1365
