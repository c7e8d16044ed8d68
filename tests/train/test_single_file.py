"""Single-file checkpoints (train/single_file.py) read back with diffusers' own
`StableDiffusionXLPipeline.from_single_file(path, config=<base folder>)`, offline: every
component comes back exactly, and on the digits model the checkpoint renders the images of the
diffusers-UNet export (within fp16 rounding of the VAE and text encoders). Set
DISTILL_TEST_CACHE to reuse a built digits model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FOUR_STEP, ONE_STEP_X0
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from distill.testing import TINY_UNET_CONFIG
from train.config import config_to_yaml, load_config
from train.export import export_stage
from train.export_info import CHECKPOINT_FORMAT, read_export_info
from train.generate import main
from train.models import save_student
from train.pipeline import load_pipeline
from train.sdxl_layout import CLIP_L_PREFIX, OPENCLIP_PREFIX, UNET_PREFIX, VAE_PREFIX
from train.single_file import encoders_share_a_width, single_file_tensors

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a handwritten digit three", "a handwritten digit eight"]
FP16_IMAGE_TOL = 2e-2  # max |Δ| of [0, 1] images from fp16-rounded VAE/text-encoder weights (~6e-3 here)



@pytest.fixture(scope="module")
def sdxl_like(tmp_path_factory, digits_dir) -> Path:
    """A random-weight SDXL-format pipeline folder whose text encoders differ in width (32 and
    48, as SDXL's 768 and 1280 differ), so diffusers can tell them apart."""
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(digits_dir, subfolder="tokenizer")
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=16, num_hidden_layers=2,
                  num_attention_heads=2, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, **common))
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(hidden_size=48, intermediate_size=96, projection_dim=16, hidden_act="gelu", **common))
    unet = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "cross_attention_dim": 80})
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4)
    with torch.no_grad():  # non-trivial norms and biases, so every tensor is distinguishable
        for module in (text_encoder, text_encoder_2, unet, vae):
            for p in module.parameters():
                p.add_(torch.randn_like(p) * 0.01)
    pipe = StableDiffusionXLPipeline(vae, text_encoder, text_encoder_2, tokenizer,
                                     CLIPTokenizer.from_pretrained(digits_dir, subfolder="tokenizer_2"),
                                     unet, EulerDiscreteScheduler(), add_watermarker=False)
    out = tmp_path_factory.mktemp("sdxl_like")
    pipe.save_pretrained(out)
    return out


def _components(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {name: getattr(pipe, name).state_dict()
            for name in ("unet", "vae", "text_encoder", "text_encoder_2")}


def test_from_single_file_restores_every_component(sdxl_like, tmp_path):
    base = StableDiffusionXLPipeline.from_pretrained(sdxl_like)
    assert not encoders_share_a_width(sdxl_like)
    tensors = single_file_tensors(base.unet.state_dict(), sdxl_like, torch.float32)
    # the original SDXL checkpoint layout, named as Stability's files are
    assert {k.split(".")[0] for k in tensors} == {"model", "conditioner", "first_stage_model"}
    for key in (f"{UNET_PREFIX}input_blocks.0.0.weight", f"{UNET_PREFIX}out.2.weight",
                f"{UNET_PREFIX}label_emb.0.0.weight", f"{UNET_PREFIX}middle_block.1.proj_in.weight",
                f"{CLIP_L_PREFIX}text_model.embeddings.token_embedding.weight",
                f"{OPENCLIP_PREFIX}transformer.resblocks.1.attn.in_proj_weight",
                f"{OPENCLIP_PREFIX}text_projection", f"{OPENCLIP_PREFIX}positional_embedding",
                f"{VAE_PREFIX}decoder.up.1.upsample.conv.weight", f"{VAE_PREFIX}encoder.mid.attn_1.q.weight"):
        assert key in tensors, key
    assert tensors[f"{OPENCLIP_PREFIX}text_projection"].shape == (48, 16)  # (width, dim): x @ P
    assert tensors[f"{VAE_PREFIX}encoder.mid.attn_1.q.weight"].ndim == 4  # 1×1 conv, as in ldm
    path = tmp_path / "model.safetensors"
    save_file(dict(tensors), str(path))
    loaded = StableDiffusionXLPipeline.from_single_file(str(path), config=str(sdxl_like), local_files_only=True)
    expected, got = _components(base), _components(loaded)
    for name, state in expected.items():
        assert got[name].keys() == state.keys(), name
        for key, value in state.items():
            assert torch.equal(got[name][key], value), f"{name}.{key}"


# ----------------------------------------------------------------------------- a digits run


def _perturb(unet, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 else 1.0))


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_dir):
    """4-step (epsilon) and 1-step (x0) finals of configs/tiny.yaml, exported in fp16 (the default)."""
    root = tmp_path_factory.mktemp("run")
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      [f"output_dir={root}", f"model.cache_dir={digits_dir.parent}", "export.dtype=fp16",
                       "export.workflows=false", "export.model_card=false"])
    (root / "config.yaml").write_text(config_to_yaml(cfg))
    written = {}
    for stage, prediction_type in ((FOUR_STEP, "epsilon"), (ONE_STEP_X0, "sample")):
        unet = UNet2DConditionModel.from_pretrained(digits_dir, subfolder="unet")
        _perturb(unet, seed=stage)
        final = root / "stages" / f"{cfg.stages[stage].student_steps}step" / "final"
        save_student(unet, prediction_type, final, origin="tests/train/test_single_file.py")
        written[stage] = {p.name: p for p in export_stage(root, cfg, stage)}
    return root, cfg, written


def _images(pipe, steps: int) -> np.ndarray:
    return pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=0.0, output_type="np",
                generator=torch.Generator().manual_seed(7)).images


@pytest.mark.parametrize("stage, checkpoint, unet_file, steps", [
    (FOUR_STEP, "tiny_lightning_4step.safetensors", "tiny_lightning_4step_unet.safetensors", 4),
    (ONE_STEP_X0, "tiny_lightning_1step_x0.safetensors", "tiny_lightning_1step_unet_x0.safetensors", 1),
])
def test_checkpoint_renders_the_unet_exports_images(run, digits_dir, stage, checkpoint, unet_file, steps):
    written = run[2][stage]
    assert checkpoint in written and unet_file in written
    info = read_export_info(written[checkpoint])
    assert info.format == CHECKPOINT_FORMAT and info.num_inference_steps == steps
    assert info.prediction_type == ("sample" if stage == ONE_STEP_X0 else "epsilon")
    with safe_open(str(written[checkpoint]), framework="pt") as f:
        assert f.get_tensor(f"{UNET_PREFIX}input_blocks.0.0.weight").dtype == torch.float16
        assert f.get_tensor(f"{VAE_PREFIX}decoder.conv_in.weight").dtype == torch.float16
    single = load_pipeline(digits_dir, written[checkpoint])
    reference = load_pipeline(digits_dir, written[unet_file])
    assert single.scheduler.config.prediction_type == info.prediction_type
    assert single.scheduler.config.timestep_spacing == "trailing"
    # the UNet inside the checkpoint is the UNet export, bit for bit
    unet_export = load_file(written[unet_file])
    single_unet = single.unet.state_dict()
    assert all(torch.equal(single_unet[k], v.float()) for k, v in unet_export.items())
    ours, theirs = _images(single, steps), _images(reference, steps)
    # the base's VAE and text encoders are stored in fp16 too: that rounding is the only difference
    assert 0 < float(np.abs(ours - theirs).max()) < FP16_IMAGE_TOL
    with torch.no_grad():
        for module in (reference.vae, reference.text_encoder, reference.text_encoder_2):
            for p in module.parameters():
                p.copy_(p.half().float())
    np.testing.assert_allclose(ours, _images(reference, steps), rtol=0, atol=1e-6)
    # and the comparison can fail: the base model's UNet renders something else
    base = StableDiffusionXLPipeline.from_pretrained(digits_dir)
    base.scheduler = single.scheduler
    base.set_progress_bar_config(disable=True)
    assert float(np.abs(_images(base, steps) - theirs).max()) > 1e-3


def test_generate_renders_a_checkpoint(run, digits_dir, tmp_path):
    out = tmp_path / "grid.png"
    main(["--base", str(digits_dir), "--export", str(run[2][FOUR_STEP]["tiny_lightning_4step.safetensors"]),
          "--prompt", PROMPTS[0], "--out", str(out)])
    assert Image.open(out).size == (32, 32)
