"""Single-file SDXL checkpoints: a distilled UNet with the base's VAE and text encoders, in the
original SDXL checkpoint layout (train/sdxl_layout.py), the kind ComfyUI's and A1111's
checkpoint loaders and diffusers' `from_single_file` read (`sdxl_lightning_4step.safetensors`).

Writing is `single_file_tensors` (the UNet weights come from the caller, the rest from the base
folder); reading back goes through diffusers' own `from_single_file`, the code users run:

    pipe = StableDiffusionXLPipeline.from_single_file(path, config=BASE_FOLDER)

with one exception: diffusers tells the two text encoders apart by their width alone (it loads
`conditioner.embedders.0` into any CLIP text model as wide as that encoder), so for a base whose
two encoders are equally wide, as the digits models', it would fill `text_encoder_2` with the
first encoder's weights. `load_single_file_pipeline` then converts that encoder from the same
file with diffusers' OpenCLIP converter and passes it in. SDXL's encoders (768 and 1280 wide)
never hit this.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from train.sdxl_layout import OPENCLIP_PREFIX, sdxl_checkpoint, unet_ldm_names


def unet_module_names(base_dir: str | os.PathLike) -> dict[str, str]:
    """diffusers → original module names of the base's UNet, built on the meta device."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(str(base_dir), subfolder="unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return unet_ldm_names(unet)


def single_file_tensors(unet_weights: Mapping[str, Tensor], base_dir: str | os.PathLike,
                        dtype: torch.dtype) -> dict[str, Tensor]:
    """The checkpoint's tensors: `unet_weights` (diffusers keys) + the base's VAE and text encoders."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    base_dir = str(base_dir)
    vae = AutoencoderKL.from_pretrained(base_dir, subfolder="vae", torch_dtype=torch.float32)
    text_encoder = CLIPTextModel.from_pretrained(base_dir, subfolder="text_encoder", dtype=torch.float32)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(base_dir, subfolder="text_encoder_2",
                                                                 dtype=torch.float32)
    return sdxl_checkpoint(unet_weights, unet_module_names(base_dir), vae.state_dict(),
                           text_encoder.state_dict(), text_encoder_2.state_dict(), dtype)


def encoders_share_a_width(base_dir: str | os.PathLike) -> bool:
    """Whether diffusers' `from_single_file` would mistake text_encoder for text_encoder_2."""
    from transformers import CLIPTextConfig

    widths = {CLIPTextConfig.from_pretrained(str(base_dir), subfolder=sub).hidden_size
              for sub in ("text_encoder", "text_encoder_2")}
    return len(widths) == 1


def text_encoder_2_from_single_file(path: str | os.PathLike, base_dir: str | os.PathLike,
                                    dtype: torch.dtype = torch.float32):
    """The second text encoder of a single file, converted by diffusers' OpenCLIP converter."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    checkpoint = {k: v for k, v in load_file(str(path)).items() if k.startswith(OPENCLIP_PREFIX)}
    model = CLIPTextModelWithProjection(
        CLIPTextConfig.from_pretrained(str(base_dir), subfolder="text_encoder_2"))
    model.load_state_dict(convert_open_clip_checkpoint(model, checkpoint, prefix=OPENCLIP_PREFIX))
    return model.to(dtype).eval()


def load_single_file_pipeline(path: str | os.PathLike, base_dir: str | os.PathLike,
                              dtype: torch.dtype = torch.float32):
    """`StableDiffusionXLPipeline.from_single_file(path, config=base_dir)`, offline."""
    from diffusers import StableDiffusionXLPipeline

    components = {}
    if encoders_share_a_width(base_dir):
        components["text_encoder_2"] = text_encoder_2_from_single_file(path, base_dir, dtype)
    return StableDiffusionXLPipeline.from_single_file(
        str(path), config=str(Path(base_dir)), local_files_only=True, torch_dtype=dtype, add_watermarker=False,
        **components)
