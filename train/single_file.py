"""Single-file SDXL checkpoints: a distilled UNet with the base's VAE and text encoders, in the
original SDXL checkpoint layout (train/sdxl_layout.py), the kind ComfyUI's and A1111's
checkpoint loaders and diffusers' `from_single_file` read (`sdxl_lightning_4step.safetensors`).

Writing is `single_file_tensors` (the UNet weights come from the caller, the rest from the base
folder), a lazy mapping that `train/tensor_files.py: write_safetensors` writes tensor by tensor;
reading back goes through diffusers' own `from_single_file`, the code users run:

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
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import Tensor

from train.sdxl_layout import (
    CLIP_L_PREFIX,
    OPENCLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    clip_l_to_ldm,
    openclip_to_ldm,
    unet_ldm_names,
    vae_to_ldm,
)
from train.tensor_files import tensor_shape


def unet_module_names(base_dir: str | os.PathLike) -> dict[str, str]:
    """diffusers → original module names of the base's UNet, built on the meta device."""
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(str(base_dir), subfolder="unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return unet_ldm_names(unet)


def single_file_tensors(unet_weights: Mapping[str, Tensor], base_dir: str | os.PathLike,
                        dtype: torch.dtype) -> Mapping[str, Tensor]:
    """The checkpoint's tensors: `unet_weights` (diffusers keys) + the base's VAE and text
    encoders, in the original layout, as a lazy mapping (`SingleFileTensors`)."""
    return SingleFileTensors(unet_weights, base_dir, dtype)


class SingleFileTensors(Mapping):
    """The tensors of a single-file checkpoint, made when read: a UNet tensor at a time from
    `unet_weights` (itself lazy: train/tensor_files.py), and one component at a time for the VAE
    and the text encoders (loaded in `dtype` when a key of theirs is first read, dropped when
    another component's is). Read in sorted key order, as `write_safetensors` does, each
    component is loaded once and the peak is the largest one (OpenCLIP bigG: 1.4 GB in fp16).
    Keys and shapes come from the components built on the meta device."""

    def __init__(self, unet_weights: Mapping[str, Tensor], base_dir: str | os.PathLike, dtype: torch.dtype):
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        self.base_dir, self.dtype_out, self.unet_weights = str(base_dir), dtype, unet_weights
        names = unet_module_names(base_dir)
        self._unet_keys = {}
        for key in unet_weights:
            module, _, param = key.rpartition(".")
            if module not in names:
                raise KeyError(f"{key!r}: its module has no original name")
            self._unet_keys[f"{UNET_PREFIX}{names[module]}.{param}"] = key
        self._loaders = {
            VAE_PREFIX: (lambda d: AutoencoderKL.from_pretrained(self.base_dir, subfolder="vae", torch_dtype=d),
                         vae_to_ldm),
            CLIP_L_PREFIX: (lambda d: CLIPTextModel.from_pretrained(self.base_dir, subfolder="text_encoder", dtype=d),
                            clip_l_to_ldm),
            OPENCLIP_PREFIX: (lambda d: CLIPTextModelWithProjection.from_pretrained(
                self.base_dir, subfolder="text_encoder_2", dtype=d), openclip_to_ldm),
        }
        with torch.device("meta"):
            meta_models = {
                VAE_PREFIX: AutoencoderKL.from_config(AutoencoderKL.load_config(self.base_dir, subfolder="vae")),
                CLIP_L_PREFIX: CLIPTextModel(CLIPTextConfig.from_pretrained(self.base_dir, subfolder="text_encoder")),
                OPENCLIP_PREFIX: CLIPTextModelWithProjection(
                    CLIPTextConfig.from_pretrained(self.base_dir, subfolder="text_encoder_2")),
            }
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._part: dict[str, str] = {}
        for prefix, model in meta_models.items():
            for key, value in self._loaders[prefix][1](model.state_dict()).items():
                self._shapes[prefix + key] = tuple(value.shape)
                self._part[prefix + key] = prefix
        self._loaded: tuple[str, dict[str, Tensor]] | None = None

    def __getitem__(self, key: str) -> Tensor:
        if key in self._unet_keys:
            return self.unet_weights[self._unet_keys[key]].to(self.dtype_out)
        prefix = self._part[key]
        if self._loaded is None or self._loaded[0] != prefix:
            self._loaded = None  # drop the previous component first
            load, convert = self._loaders[prefix]
            self._loaded = (prefix, convert(load(self.dtype_out).state_dict()))
        return self._loaded[1][key[len(prefix):]].to(self.dtype_out)

    def __iter__(self) -> Iterator[str]:
        yield from self._unet_keys
        yield from self._part

    def __len__(self) -> int:
        return len(self._unet_keys) + len(self._part)

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._unet_keys:
            return tensor_shape(self.unet_weights, self._unet_keys[key])
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self.dtype_out


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
