"""The random-weight SDXL builder: exact published architecture (on the meta device) and a
small variant built through the same code, loaded by diffusers' pipeline and by load_base."""

import torch

from distill.testing import SDXL_UNET_CONFIG
from train.random_sdxl import (
    SDXL_PARAMETER_COUNTS,
    SDXL_VOCAB_SIZE,
    build_components,
    build_random_sdxl,
    clip_vocabulary,
    sdxl_spec,
    small_spec,
)


def test_sdxl_spec_has_the_published_parameter_counts():
    counts = {name: sum(p.numel() for p in module.parameters())
              for name, module in build_components(sdxl_spec(), device="meta")}
    assert counts == SDXL_PARAMETER_COUNTS
    assert sdxl_spec().unet == SDXL_UNET_CONFIG


def test_clip_vocabulary_has_exactly_the_requested_size():
    tokens, merges = clip_vocabulary(SDXL_VOCAB_SIZE)
    assert len(tokens) == len(set(tokens)) == SDXL_VOCAB_SIZE
    assert tokens[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    assert len(merges) == SDXL_VOCAB_SIZE - 512 - 2


def test_small_variant_loads_in_the_sdxl_pipeline_offline(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    report = build_random_sdxl(tmp_path / "model", small_spec(), torch.float32)
    assert set(report.parameters) == {"unet", "text_encoder", "text_encoder_2", "vae"}
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "model", local_files_only=True)
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        assert len(tokenizer) == encoder.config.vocab_size == SDXL_VOCAB_SIZE
        assert tokenizer.model_max_length == encoder.config.max_position_embeddings == 77
    assert pipe.tokenizer_2.pad_token == "!"
    ids = pipe.tokenizer("a photo of a cat").input_ids
    assert ids[0] == SDXL_VOCAB_SIZE - 2 and ids[-1] == SDXL_VOCAB_SIZE - 1
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a cat", num_inference_steps=1, height=64, width=64,
                 guidance_scale=0.0, output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_small_variant_loads_as_a_training_base(tmp_path):
    from train.config import ModelConfig
    from train.models import load_base

    build_random_sdxl(tmp_path / "model", small_spec(), torch.float16)
    base = load_base(tmp_path / "model", ModelConfig(base=str(tmp_path / "model")), torch.device("cpu"),
                     torch.float32)
    assert base.prediction_type == "epsilon"
    cond = base.text.conditioning(["a cat", ""], torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2))
    assert cond.prompt_embeds.shape == (2, 77, 64 + 128) and cond.pooled_embeds.shape == (2, 128)
