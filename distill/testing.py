"""Tiny SDXL-format models with random weights, for tests and benchmarks.

These are the same diffusers classes as SDXL (`UNet2DConditionModel` with
`addition_embed_type="text_time"`), only narrow, so every code path the framework runs on
SDXL runs here in milliseconds on a CPU.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from distill.conditioning import Conditioning

# Widths chosen so GroupNorm(32) in the discriminator heads divides every feature map.
TINY_UNET_CONFIG = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    transformer_layers_per_block=1,
    attention_head_dim=(2, 4),
    norm_num_groups=32,
    cross_attention_dim=32,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,
    use_linear_projection=True,
)
TINY_PROMPT_DIM = 32
TINY_POOLED_DIM = 16
TINY_PROMPT_LEN = 7


def tiny_unet(seed: int = 0, **overrides) -> UNet2DConditionModel:
    """A random-weight SDXL-style UNet for 4×8×8 latents."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**TINY_UNET_CONFIG, **overrides})


def random_conditioning(batch_size: int, seed: int = 0, size: int = 32) -> Conditioning:
    """Random text embeddings and SDXL time_ids for `size`×`size` images."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randn(batch_size, TINY_PROMPT_LEN, TINY_PROMPT_DIM, generator=g)
    pooled = torch.randn(batch_size, TINY_POOLED_DIM, generator=g)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(batch_size, 1)
    return Conditioning(prompt, pooled, time_ids)


# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json, the published architecture values
# (no weights): build with `UNet2DConditionModel(**SDXL_UNET_CONFIG)` under
# `torch.device("meta")` to check shapes and parameter counts at real size on a CPU.
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
    upcast_attention=False,
)


def sdxl_unet_on_meta() -> UNet2DConditionModel:
    """The SDXL UNet architecture on the meta device: shapes and counts, no memory."""
    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET_CONFIG)
