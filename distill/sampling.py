"""The reference sampler: what users get from an export, computed with the framework's math.

`sample` walks diffusers' trailing grid with `move` from the same starting point as
`StableDiffusionXLPipeline` with `EulerDiscreteScheduler(timestep_spacing="trailing")`, and
reproduces that pipeline's final latents on the same initial noise (tested against both the
scheduler loop and the pipeline itself). Validation during training uses it, so what is
logged is what users will see (METHOD.md §6).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.conditioning import Conditioning
from distill.schedule import CLEAN, NoiseSchedule, pipeline_start
from distill.teacher import Teacher


@torch.no_grad()
def sample(unet: nn.Module, schedule: NoiseSchedule, noise: Tensor, cond: Conditioning,
           num_steps: int, prediction_type: str = "epsilon", guidance_scale: float = 0.0) -> Tensor:
    """Clean latents after `num_steps` deterministic steps from `noise` (unit Gaussian).

    Starts at pipeline_start(noise) = sqrt(1 − abar_T)·noise, the pipeline's first UNet input
    (not pure noise), and runs the model with guidance as the pipeline does (w > 1 only).
    """
    model = Teacher(unet, schedule, prediction_type=prediction_type, guidance_scale=guidance_scale)
    batch = noise.shape[0]
    t = torch.full((batch,), schedule.last_timestep, dtype=torch.long, device=noise.device)
    clean = torch.full_like(t, CLEAN)
    # The whole trajectory T → clean is one "teacher walk" along the num_steps trailing grid.
    return model.target(pipeline_start(schedule, noise), t, clean, cond, teacher_steps=num_steps)


@torch.no_grad()
def decode_latents(vae: nn.Module, latents: Tensor) -> Tensor:
    """Images in [0, 1], (B, 3, H, W) float32, exactly as the SDXL pipeline post-processes.

    The latents go in the VAE's dtype: keep the SDXL VAE in fp32 (or use a fixed fp16 VAE),
    it overflows in fp16 (ARCHITECTURE.md pitfall 5).
    """
    config = vae.config
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if mean is not None and std is not None:  # VAEs with per-channel statistics (pipeline does this)
        shape = (1, -1, 1, 1)
        mean = torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape)
        latents = latents * std / config.scaling_factor + mean
    else:
        latents = latents / config.scaling_factor
    images = vae.decode(latents.to(vae.dtype)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)
