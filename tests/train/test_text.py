"""train/text.py and scripts/precompute_latents.py against the tiny digits model (a real
diffusers SDXL folder): text embeddings equal the pipeline's encode_prompt, empty/dropped
captions are zeros, VAE latents, and precomputed shards round-trip."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline

from train.data import image_loader_single_pass, latent_loader
from train.digits.builder import ensure_digits_model
from train.digits.shards import ensure_digits_shards
from train.text import TextEmbeddings, encode_images, load_text_encoders

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import precompute_latents  # noqa: E402

PROMPTS = ["a handwritten digit seven", "a handwritten digit zero",
           # longer than the tiny tokenizers' 16 tokens: exercises truncation
           "a handwritten digit one two three four five six seven eight nine zero one two"]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return ensure_digits_model(size="tiny")


@pytest.fixture(scope="module")
def encoders(model_dir):
    return load_text_encoders(model_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def vae(model_dir):
    return AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32).eval()


def test_encode_equals_pipeline_encode_prompt(model_dir, encoders):
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    prompt, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu",
                                              do_classifier_free_guidance=False)
    ours = encoders.encode(PROMPTS)
    assert ours.prompt_embeds.shape == prompt.shape
    assert ours.pooled_embeds.shape == pooled.shape
    torch.testing.assert_close(ours.prompt_embeds, prompt, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.pooled_embeds, pooled, rtol=0, atol=1e-6)
    # The shapes the UNet expects: D1 + D2 = cross_attention_dim, pooled + 6 time embeddings.
    unet = pipe.unet.config
    assert prompt.shape[-1] == unet.cross_attention_dim
    assert pooled.shape[-1] + 6 * unet.addition_time_embed_dim == \
        unet.projection_class_embeddings_input_dim
    assert prompt.abs().sum(-1).gt(0).all()  # real captions are not zero anywhere


def test_empty_and_dropped_captions_are_all_zeros(encoders):
    captions = ["a handwritten digit two", "", "a handwritten digit three", "   "]
    full = encoders.encode(captions)
    drop = torch.tensor([False, False, True, False])
    dropped = encoders.encode(captions, drop_mask=drop)
    zero = torch.tensor([False, True, True, True])
    for out in (dropped.prompt_embeds, dropped.pooled_embeds):
        assert (out[zero] == 0).all()
    assert (full.prompt_embeds[1] == 0).all() and (full.pooled_embeds[3] == 0).all()
    assert torch.equal(dropped.prompt_embeds[0], full.prompt_embeds[0])
    assert not (full.prompt_embeds[2] == 0).all()
    with pytest.raises(ValueError, match="drop_mask"):
        encoders.encode(captions, drop_mask=[True, False])


def test_conditioning_carries_time_ids_and_runs_the_unet(model_dir, encoders):
    time_ids = torch.tensor([[32.0, 32, 0, 0, 32, 32], [40, 24, 4, 0, 32, 32]])
    cond = encoders.conditioning(PROMPTS[:2], time_ids, drop_mask=[False, True])
    assert torch.equal(cond.time_ids, time_ids)
    assert (cond.prompt_embeds[1] == 0).all() and not (cond.prompt_embeds[0] == 0).all()
    pipe = StableDiffusionXLPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = pipe.unet(x, torch.tensor([999, 500]), **cond.unet_kwargs()).sample
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_encode_images_mean_sample_and_dtype_guard(vae):
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = encode_images(vae, pixels)
    assert mean.shape == (3, 4, 8, 8) and mean.dtype == torch.float32
    expected = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(mean, expected)
    s1 = encode_images(vae, pixels, posterior="sample", generator=torch.Generator().manual_seed(1))
    s2 = encode_images(vae, pixels, posterior="sample", generator=torch.Generator().manual_seed(1))
    s3 = encode_images(vae, pixels, posterior="sample", generator=torch.Generator().manual_seed(2))
    assert torch.equal(s1, s2) and not torch.equal(s1, s3) and not torch.equal(s1, mean)
    with pytest.raises(ValueError, match="VAE is"):
        encode_images(vae, pixels, dtype=torch.float16)
    with pytest.raises(ValueError, match="posterior"):
        encode_images(vae, pixels, posterior="mode")


def test_precompute_script_round_trips_latents_and_embeddings(tmp_path, model_dir, encoders,
                                                              vae):
    shards = ensure_digits_shards()
    first = shards.eval_urls  # the held-out split: one shard
    out = tmp_path / "latents"
    summary = precompute_latents.main([
        "--model", str(model_dir), "--shards", first, "--out", str(out), "--resolution", "32",
        "--samples-per-shard", "100", "--batch-size", "64", "--device", "cpu"])
    assert summary["samples"] == shards.num_eval and summary["skipped"] == {}
    written = sorted(out.glob("latents-*.tar"))
    assert len(written) == -(-shards.num_eval // 100) == summary["shards"]

    # The same images, read and encoded directly.
    images = image_loader_single_pass(first, batch_size=shards.num_eval, resolution=32,
                                      rank=0, world_size=1)
    batch = next(iter(images))
    direct = dict(zip(batch.keys, encode_images(vae, batch.pixels)))
    text = encoders.conditioning(batch.captions, batch.time_ids)
    index = {k: i for i, k in enumerate(batch.keys)}

    seen = []
    for n, shard in enumerate(written):  # each shard once, in order: one batch of its size
        size = min(100, shards.num_eval - 100 * n)
        stream = latent_loader(str(shard), batch_size=size, seed=0, rank=0, world_size=1,
                               resume_step=0, shuffle_buffer=0)
        lb = next(iter(stream))
        for j, key in enumerate(lb.keys):
            i = index[key]
            seen.append(key)
            torch.testing.assert_close(lb.latents[j], direct[key], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(lb.cond.prompt_embeds[j], text.prompt_embeds[i])
            torch.testing.assert_close(lb.cond.pooled_embeds[j], text.pooled_embeds[i])
            assert lb.cond.time_ids[j].tolist() == [32, 32, 0, 0, 32, 32]
            assert lb.captions[j] == batch.captions[i]
    assert seen == batch.keys  # every sample once, in the source order


def test_time_ids_stay_float32_beside_bf16_embeddings():
    """Pitfall 11: bf16 text encoders must not round 1365 px to 1368."""
    embeddings = TextEmbeddings(torch.zeros(1, 3, 4, dtype=torch.bfloat16),
                                torch.zeros(1, 4, dtype=torch.bfloat16))
    exact = torch.tensor([[1365.0, 1024.0, 301.0, 0.0, 1024.0, 1024.0]])
    cond = embeddings.with_time_ids(exact)
    assert cond.time_ids.dtype == torch.float32 and torch.equal(cond.time_ids, exact)
