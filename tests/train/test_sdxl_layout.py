"""The original SDXL layout (train/sdxl_layout.py) against the loaders' own code: every UNet key
and every LoRA target of the real SDXL architecture (on the meta device) and of the digits
UNet gets an original name that diffusers' converters turn back into exactly that module, and a
LoRA written in those names fuses through `load_lora_weights` to the weights of our own merge.
Set DISTILL_TEST_CACHE to reuse a built digits model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.utils import convert_unet_state_dict_to_peft
from safetensors.torch import load_file, save_file

from distill.lora import LoraLayer, fold_lora, kohya_name, kohya_state_dict, lora_target_modules
from distill.testing import SDXL_UNET_CONFIG, sdxl_unet_on_meta
from train.sdxl_layout import UNET_PREFIX, lora_file_names, unet_ldm_names, unet_to_ldm

SDXL_LORA_MODULES = 788  # LCM-LoRA targets of SDXL's UNet (conv_in/out and time MLPs excluded)


@pytest.fixture(scope="module")
def sdxl():
    return sdxl_unet_on_meta()


def _digits_unet(digits_dir: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(digits_dir, subfolder="unet")


def _small_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL's UNet structure (3 levels, 2 layers per block, 1/2/10 transformer layers) at
    shrunken widths, reading the digits model's text embeddings (2×32 wide, pooled 16)."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**{**SDXL_UNET_CONFIG, "sample_size": 8, "block_out_channels": (32, 32, 64),
                                   "attention_head_dim": (1, 2, 2), "cross_attention_dim": 64,
                                   "addition_time_embed_dim": 8,
                                   "projection_class_embeddings_input_dim": 16 + 6 * 8})


def _original_unet_keys(unet, state=None) -> dict:
    state = unet.state_dict() if state is None else state
    return {UNET_PREFIX + k: v for k, v in unet_to_ldm(state, unet_ldm_names(unet)).items()}


@pytest.mark.parametrize("which", ["sdxl", "digits"])
def test_every_unet_key_round_trips_through_diffusers_single_file_converter(which, sdxl, digits_dir):
    unet = sdxl if which == "sdxl" else _digits_unet(digits_dir)
    state = unet.state_dict()
    original = _original_unet_keys(unet, state)
    assert len(original) == len(state)  # 1680 at SDXL size
    back = convert_ldm_unet_checkpoint(original, dict(unet.config))
    assert back.keys() == state.keys()
    assert all(back[k] is state[k] for k in state)  # each tensor under its own name again


def test_sdxl_names_are_the_original_ones(sdxl):
    names = unet_ldm_names(sdxl)
    assert names["conv_in"] == "input_blocks.0.0" and names["conv_out"] == "out.2"
    assert names["add_embedding.linear_1"] == "label_emb.0.0"
    assert names["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
    assert names["down_blocks.1.attentions.0.proj_in"] == "input_blocks.4.1.proj_in"
    assert names["down_blocks.2.resnets.1.conv2"] == "input_blocks.8.0.out_layers.3"
    assert names["mid_block.attentions.0.transformer_blocks.9.attn2.to_k"] == \
        "middle_block.1.transformer_blocks.9.attn2.to_k"
    assert names["mid_block.resnets.1.time_emb_proj"] == "middle_block.2.emb_layers.1"
    assert names["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"
    assert names["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert names["up_blocks.2.resnets.2.conv_shortcut"] == "output_blocks.8.0.skip_connection"
    blocks = {".".join(v.split(".")[:2]) for v in names.values() if "_block" in v}
    assert blocks == {*(f"input_blocks.{i}" for i in range(9)), *(f"middle_block.{i}" for i in range(3)),
                      *(f"output_blocks.{i}" for i in range(9))}


def test_all_sdxl_lora_modules_get_kohya_sdxl_names(sdxl):
    targets = lora_target_modules(sdxl)
    assert len(targets) == SDXL_LORA_MODULES
    keys = {kohya_name(v) for v in lora_file_names(sdxl, targets).values()}
    assert len(keys) == SDXL_LORA_MODULES
    for known in ("lora_unet_input_blocks_4_1_proj_in", "lora_unet_output_blocks_2_2_conv",
                  "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q",
                  "lora_unet_middle_block_0_emb_layers_1", "lora_unet_input_blocks_1_0_in_layers_2"):
        assert known in keys
    assert not any("down_blocks" in k or "up_blocks" in k or "mid_block_" in k for k in keys)
    # each names a module of the original layout (a weight of the original checkpoint)
    original_modules = {k[len(UNET_PREFIX):].rsplit(".", 1)[0] for k in _original_unet_keys(sdxl)}
    lookup = {kohya_name(m): m for m in original_modules}
    assert keys <= lookup.keys()


@pytest.mark.parametrize("which", ["sdxl", "digits"])
def test_diffusers_maps_every_original_lora_name_back(which, sdxl, digits_dir):
    """diffusers' own kohya/sgm converter (what load_lora_weights runs) turns each original name
    into exactly its module's peft key."""
    unet = sdxl if which == "sdxl" else _digits_unet(digits_dir)
    targets = lora_target_modules(unet)
    state = {}
    for name in lora_file_names(unet, targets).values():
        key = kohya_name(name)
        state.update({f"{key}.lora_down.weight": torch.zeros(1), f"{key}.lora_up.weight": torch.zeros(1),
                      f"{key}.alpha": torch.tensor(2.0)})
    state = _maybe_map_sgm_blocks_to_diffusers(state, unet.config)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(state)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert set(peft) == {f"{m}.lora_{ab}.weight" for m in targets for ab in "AB"}
    assert len(alphas) == len(targets)


def _random_lora(unet, rank: int, alpha: float, seed: int) -> dict[str, LoraLayer]:
    g = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    layers = {}
    for name in lora_target_modules(unet):
        w = modules[name].weight
        up_shape = (w.shape[0], rank) if w.ndim == 2 else (w.shape[0], rank, 1, 1)
        layers[name] = LoraLayer(torch.randn(rank, *w.shape[1:], generator=g) * 0.1,
                                 torch.randn(up_shape, generator=g) * 0.1, alpha)
    return layers


@pytest.mark.parametrize("which", ["small_sdxl", "digits"])
def test_load_lora_weights_fuses_to_our_merge(which, digits_dir, tmp_path):
    """A LoRA file in original names (alpha ≠ rank) through diffusers' `load_lora_weights` +
    `fuse_lora` gives exactly the weights of `fold_lora`, on every target."""
    digits = StableDiffusionXLPipeline.from_pretrained(digits_dir)
    unet = _small_sdxl_unet() if which == "small_sdxl" else digits.unet
    unet.eval()
    base = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    layers = _random_lora(unet, rank=2, alpha=3.0, seed=1)
    names = lora_file_names(unet, layers)
    path = tmp_path / "lora.safetensors"
    save_file(kohya_state_dict({names[m]: la for m, la in layers.items()}, torch.float32), str(path))
    assert any(k.startswith("lora_unet_output_blocks_") for k in load_file(path))
    pipe = StableDiffusionXLPipeline(digits.vae, digits.text_encoder, digits.text_encoder_2,
                                     digits.tokenizer, digits.tokenizer_2, unet, digits.scheduler)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    fused = {k.replace(".base_layer.", "."): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    expected = fold_lora(base, layers)
    assert fused.keys() == expected.keys()
    changed = 0
    for key, value in expected.items():
        torch.testing.assert_close(fused[key], value, rtol=0, atol=1e-5)
        changed += not torch.equal(value, base[key])
    assert changed == len(layers)  # the comparison can fail: every target moved
