"""The reference sampler reproduces diffusers' trailing-Euler SDXL sampling (METHOD.md §6)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline

from distill.sampling import decode_latents, sample
from distill.schedule import SDXL_SCHEDULER_CONFIG, NoiseSchedule
from distill.testing import random_conditioning, tiny_unet

SCHEDULE = NoiseSchedule.from_scheduler_config(SDXL_SCHEDULER_CONFIG)


def noise(batch, seed=0, dtype=torch.float32):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@torch.no_grad()
def euler_loop(unet, latents, cond, num_steps, prediction_type, guidance_scale=0.0):
    """The denoising loop of StableDiffusionXLPipeline, written out."""
    sched = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG, timestep_spacing="trailing",
                                   prediction_type=prediction_type)
    sched.set_timesteps(num_steps)
    latents = latents * sched.init_noise_sigma
    guided = guidance_scale > 1
    if guided:
        both = cond.unconditional().cat(cond)
    for t in sched.timesteps:
        model_input = sched.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        c = both if guided else cond
        out = unet(model_input, t, **c.to(dtype=model_input.dtype).unet_kwargs()).sample
        if guided:
            uncond, text = out.chunk(2)
            out = uncond + guidance_scale * (text - uncond)
        latents = sched.step(out, t, latents).prev_sample
    return latents


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
@pytest.mark.parametrize("num_steps", [1, 2, 4])
def test_sample_matches_the_euler_loop(num_steps, prediction_type):
    unet = tiny_unet(seed=1).eval().double()
    cond = random_conditioning(2, seed=1).to(dtype=torch.float64)
    x_T = noise(2, seed=2, dtype=torch.float64)
    ours = sample(unet, SCHEDULE, x_T, cond, num_steps, prediction_type=prediction_type)
    ref = euler_loop(unet, x_T, cond, num_steps, prediction_type)
    assert ours.dtype == torch.float64
    # Euler upcasts only to fp32 inside `step`, so agreement is at fp32 precision.
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_sample_with_guidance_matches_the_euler_loop():
    unet = tiny_unet(seed=2).eval()
    cond = random_conditioning(2, seed=3)
    x_T = noise(2, seed=4)
    ours = sample(unet, SCHEDULE, x_T, cond, 4, guidance_scale=5.0)
    ref = euler_loop(unet, x_T, cond, 4, "epsilon", guidance_scale=5.0)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    unguided = sample(unet, SCHEDULE, x_T, cond, 4)
    assert not torch.allclose(ours, unguided, atol=1e-2)


def test_sample_is_not_started_from_pure_noise():
    """The pipeline's first UNet input is sqrt(1 − abar_T)·noise; starting from noise itself
    gives a measurably different sample."""
    unet = tiny_unet(seed=1).eval().double()
    cond = random_conditioning(1, seed=5).to(dtype=torch.float64)
    x_T = noise(1, seed=6, dtype=torch.float64)
    ref = euler_loop(unet, x_T, cond, 2, "epsilon")
    scaled = x_T / (1 - SCHEDULE.alphas_cumprod[-1]).sqrt()  # so pipeline_start gives x_T
    assert not torch.allclose(sample(unet, SCHEDULE, scaled, cond, 2), ref, rtol=1e-4, atol=1e-4)


def tiny_vae(**overrides):
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 32),
                         latent_channels=4, norm_num_groups=32, sample_size=16,
                         scaling_factor=0.13025, **overrides).eval()


@pytest.mark.parametrize("vae_stats", [False, True])
@pytest.mark.parametrize("prediction_type,guidance_scale", [("epsilon", 0.0), ("epsilon", 3.0),
                                                            ("sample", 0.0)])
def test_sample_and_decode_reproduce_the_sdxl_pipeline(prediction_type, guidance_scale, vae_stats):
    """End to end against StableDiffusionXLPipeline itself, with embeddings passed in (the
    text encoders are not under test) and all-zero negative embeddings."""
    stats = dict(latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(0.9, 1.1, 1.0, 0.8)) if vae_stats else {}
    vae, unet = tiny_vae(**stats), tiny_unet(seed=3).eval()
    scheduler = EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG, timestep_spacing="trailing",
                                       prediction_type=prediction_type)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    size = 8 * pipe.vae_scale_factor  # 8×8 latents
    cond = random_conditioning(2, seed=7, size=size)  # time_ids (size, size, 0, 0, size, size)
    x_T = noise(2, seed=8)
    zeros = cond.unconditional()
    images = pipe(prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled_embeds,
                  negative_prompt_embeds=zeros.prompt_embeds,
                  negative_pooled_prompt_embeds=zeros.pooled_embeds, latents=x_T.clone(),
                  height=size, width=size, num_inference_steps=2, guidance_scale=guidance_scale,
                  output_type="pt").images
    ours = decode_latents(vae, sample(unet, SCHEDULE, x_T, cond, 2, prediction_type=prediction_type,
                                      guidance_scale=guidance_scale))
    assert ours.shape == images.shape == (2, 3, size, size)
    assert ours.dtype == torch.float32 and 0 <= ours.min() and ours.max() <= 1
    torch.testing.assert_close(ours, images, rtol=1e-4, atol=1e-4)
