"""train/digits/plugin_training.py on the tiny digits model: the style LoRA's file loads
unchanged with diffusers' `load_lora_weights` and reproduces the trained adapter; the
ControlNet downsamples its conditioning to the latent grid and drives the UNet; both cache."""

from __future__ import annotations

import json

import pytest
import torch

from train.digits.data import TIME_IDS
from train.digits.plugin_training import (
    PLUGIN_INFO,
    ControlNetSpec,
    StyleLoraSpec,
    conditioning_widths,
    ensure_silhouette_controlnet,
    ensure_style_lora,
    fit_style_lora,
    plugin_dir_for,
    save_style_lora,
)
from train.pipeline import load_pipeline, with_controlnet

TINY_LORA = StyleLoraSpec(steps=3, batch_size=4, rank=4)
TINY_CONTROLNET = ControlNetSpec(steps=3, batch_size=4)


def unet_inputs(pipe, n: int = 2):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        text, _, pooled, _ = pipe.encode_prompt(["a bold handwritten digit seven"] * n, device="cpu",
                                                do_classifier_free_guidance=False)
    return dict(sample=torch.randn(n, 4, 8, 8, generator=g), timestep=torch.tensor([500, 900]),
                encoder_hidden_states=text,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": torch.tensor([TIME_IDS] * n).float()})


def test_style_lora_file_loads_with_load_lora_weights_and_reproduces_the_adapter(digits_dir, tmp_path):
    pipe = load_pipeline(digits_dir)
    fit = fit_style_lora(pipe, TINY_LORA)
    inputs = unet_inputs(pipe)
    with torch.no_grad():
        trained = fit.model(**inputs).sample
        fit.model.disable_adapters()
        base = fit.model(**inputs).sample
    assert (trained - base).abs().max() > 1e-6, "three steps should move the LoRA off zero"
    save_style_lora(fit.model, tmp_path / "lora")

    user = load_pipeline(digits_dir)  # a fresh base pipeline, as users load one
    user.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        loaded = user.unet(**inputs).sample
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)  # strength 1, alpha kept


def test_conditioning_widths_downsample_by_the_vae_factor():
    assert conditioning_widths(8) == (16, 32, 96, 256)  # SDXL: diffusers' default
    assert conditioning_widths(4) == (16, 32, 96)  # the digits VAE: two stride-2 blocks
    for bad in (3, 16):
        with pytest.raises(ValueError):
            conditioning_widths(bad)


def test_plugins_train_once_into_their_hashed_folders_and_load(digits_dir, tmp_path):
    from diffusers import ControlNetModel

    lora = ensure_style_lora(digits_dir, TINY_LORA, tmp_path)
    controlnet_dir = ensure_silhouette_controlnet(digits_dir, TINY_CONTROLNET, tmp_path)
    assert lora.parent == plugin_dir_for("style_lora", digits_dir, TINY_LORA, tmp_path)
    info = json.loads((controlnet_dir.parent / PLUGIN_INFO).read_text())
    assert info["kind"] == "controlnet" and info["spec"]["steps"] == 3
    stamp = (controlnet_dir.parent / PLUGIN_INFO).stat().st_mtime_ns
    assert ensure_silhouette_controlnet(digits_dir, TINY_CONTROLNET, tmp_path) == controlnet_dir
    assert (controlnet_dir.parent / PLUGIN_INFO).stat().st_mtime_ns == stamp  # reused, not retrained
    other = ControlNetSpec(steps=4, batch_size=4)
    assert plugin_dir_for("controlnet", digits_dir, other, tmp_path) != controlnet_dir.parent

    # The ControlNet's residuals match the UNet's blocks at the latent scale, and change the
    # image once its zero-initialised output convolutions have trained a few steps.
    controlnet = ControlNetModel.from_pretrained(str(controlnet_dir))
    pipe = load_pipeline(digits_dir)
    controlled = with_controlnet(pipe, controlnet)
    control = torch.zeros(1, 3, 32, 32)
    control[..., 8:24, 12:20] = 1.0
    run = dict(prompt="a handwritten digit one", num_inference_steps=2, guidance_scale=0.0,
               output_type="pt")
    with_cn = controlled(image=control, generator=torch.Generator().manual_seed(0), **run).images
    without = pipe(generator=torch.Generator().manual_seed(0), **run).images
    assert with_cn.shape == without.shape == (1, 3, 32, 32)
    assert torch.isfinite(with_cn).all() and (with_cn - without).abs().max() > 0
