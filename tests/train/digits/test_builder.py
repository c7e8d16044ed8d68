"""The embedded digits model: the tiny variant built from scratch, loaded back from disk
through diffusers/transformers exactly as users load it, offline."""

from __future__ import annotations

import json
import os

import pytest
import torch

from train.digits.builder import build_digits_model, ensure_digits_model
from train.digits.data import DIGIT_NAMES, INFO_FILE, prompt_for, read_model_info
from train.digits.metrics import evaluate_pipeline
from train.pipeline import load_pipeline


@pytest.fixture(scope="session")
def tiny_model(digits_cache):
    return ensure_digits_model(digits_cache, "tiny")


def test_tokenizers_round_trip_prompts_offline(tiny_model):
    from transformers import CLIPTokenizer

    for sub in ("tokenizer", "tokenizer_2"):
        assert (tiny_model / sub / "vocab.json").exists() and (tiny_model / sub / "merges.txt").exists()
        tok = CLIPTokenizer.from_pretrained(tiny_model / sub, local_files_only=True)
        assert tok.model_max_length == 16
        for d in range(10):
            ids = tok(prompt_for(d), padding="max_length", max_length=tok.model_max_length).input_ids
            assert len(ids) == 16
            tokens = tok.convert_ids_to_tokens(ids[:6])
            # bos, one token per word, eos: the merges build whole words.
            assert tokens == ["<|startoftext|>", "a</w>", "handwritten</w>", "digit</w>",
                              DIGIT_NAMES[d] + "</w>", "<|endoftext|>"]
            assert tok.decode(ids, skip_special_tokens=True) == prompt_for(d)
        # Any other text still tokenizes (byte fallback) and round-trips.
        other = tok("Zebra 42!").input_ids
        assert tok.decode(other, skip_special_tokens=True) == "zebra 4 2 !"


def test_model_folder_is_sdxl_format(tiny_model):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model, local_files_only=True)
    unet, te1, te2 = pipe.unet.config, pipe.text_encoder.config, pipe.text_encoder_2.config
    assert unet.addition_embed_type == "text_time"
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.projection_class_embeddings_input_dim == te2.projection_dim + 6 * unet.addition_time_embed_dim
    assert all(c % 32 == 0 for c in unet.block_out_channels)
    assert te1.max_position_embeddings == pipe.tokenizer.model_max_length
    assert pipe.vae_scale_factor == 4 and unet.sample_size == 8
    assert pipe.vae.config.scaling_factor != 0.18215  # fitted to the latents, not SD's constant
    sched = pipe.scheduler.config
    assert (sched.beta_start, sched.beta_end, sched.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert sched.prediction_type == "epsilon"
    assert pipe.config.force_zeros_for_empty_prompt
    info = read_model_info(tiny_model)
    assert info["size"] == "tiny" and info["resolution"] == 32 and info["guidance_scale"] > 1
    assert info["metrics"]["vae"]["recon_psnr"] > 0


def test_pipeline_renders_finite_images(tiny_model):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    out = pipe([prompt_for(3), prompt_for(7)], num_inference_steps=2, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert out.shape == (2, 3, 32, 32)
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out[0], out[1])


def test_ensure_reuses_cache_and_leaves_no_temp_dirs(tiny_model, digits_cache):
    stamp = os.path.getmtime(tiny_model / INFO_FILE)
    assert ensure_digits_model(digits_cache, "tiny") == tiny_model
    assert os.path.getmtime(tiny_model / INFO_FILE) == stamp
    assert not [p for p in digits_cache.iterdir() if p.name.startswith(".")]


def test_unknown_size_fails_naming_the_choices(tmp_path):
    with pytest.raises(ValueError, match="full"):
        build_digits_model(tmp_path / "m", size="huge")


@pytest.mark.slow
def test_full_model_renders_the_prompted_digit():
    """The default teacher (built into the default cache if missing, ~10 min on 2 cores):
    32 trailing Euler steps with its stored CFG scale read as the prompted digit ≥ 90 %."""
    path = ensure_digits_model(size="full")
    info = json.loads((path / INFO_FILE).read_text())
    result = evaluate_pipeline(load_pipeline(path), 32, 20, info["guidance_scale"], seed=1)
    assert result.accuracy >= 0.9
