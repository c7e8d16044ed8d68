"""Memory and speed options (issue #10 item 6): 8-bit AdamW, torch.compile, SDPA attention."""

import pytest
import torch

from discriminator.model import Discriminator
from distill.testing import random_conditioning, tiny_unet
from train.build import compile_module, make_optimizer
from train.config import ConfigError, OptimConfig, RuntimeConfig


def test_optimizer_key_is_validated():
    assert OptimConfig(optimizer="adamw8bit").optimizer == "adamw8bit"
    with pytest.raises(ConfigError, match="optimizer"):
        OptimConfig(optimizer="adam8")
    assert RuntimeConfig(compile=True).compile


def test_adamw_is_torchs():
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = make_optimizer(params, lr=1e-3, betas=(0.0, 0.99), weight_decay=0.0, kind="adamw",
                         device=torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.0, 0.99)


def test_adamw8bit_without_cuda_fails_clearly():
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(RuntimeError, match="adamw8bit needs a CUDA device"):
        make_optimizer(params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, kind="adamw8bit",
                       device=torch.device("cpu"))


@pytest.mark.gpu
def test_adamw8bit_on_cuda_steps():
    pytest.importorskip("bitsandbytes")
    p = torch.nn.Parameter(torch.ones(4096, device="cuda"))
    opt = make_optimizer([p], lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0, kind="adamw8bit",
                         device=torch.device("cuda"))
    p.sum().backward()
    opt.step()
    assert (p < 1).all() and type(opt).__module__.startswith("bitsandbytes")


def test_compiled_student_and_discriminator_match_eager_with_unchanged_keys():
    torch.manual_seed(0)
    unet = tiny_unet()
    disc = Discriminator(unet, conditional=False, bucket_edges=[500], multiscale=False,
                         backbone_trainable=True, head_channels=None)
    cond = random_conditioning(2)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 499])
    keys = list(unet.state_dict())
    ref_u, ref_d = unet(x, t, **cond.unet_kwargs()).sample, disc(x, t, cond)
    compile_module(unet, "eager")
    compile_module(disc, "eager")
    assert list(unet.state_dict()) == keys
    torch.testing.assert_close(unet(x, t, **cond.unet_kwargs()).sample, ref_u)
    torch.testing.assert_close(disc(x, t, cond), ref_d)


def test_attention_is_pytorch_sdpa_everywhere(tmp_path):
    from diffusers.models.attention_processor import AttnProcessor2_0

    from train.config import ModelConfig
    from train.models import load_base
    from train.random_sdxl import build_random_sdxl, small_spec

    build_random_sdxl(tmp_path / "m", small_spec(), torch.float32)
    base = load_base(tmp_path / "m", ModelConfig(base=str(tmp_path / "m")), torch.device("cpu"), torch.float32)
    assert {type(p) for p in base.unet.attn_processors.values()} == {AttnProcessor2_0}
    assert {type(p) for p in base.vae.attn_processors.values()} == {AttnProcessor2_0}
    for encoder in (base.text.text_encoder, base.text.text_encoder_2):
        assert encoder.config._attn_implementation == "sdpa"
