"""Frozen weights stored in half precision and computed in fp32 layer by layer (issue #16)."""

import copy

import pytest
import torch

from distill.lora import add_lora
from distill.precision import compute_dtype, remove_frozen_storage, store_frozen
from distill.student import trainable_parameters
from distill.testing import random_conditioning, tiny_unet


def _rounded_fp32(unet, dtype):
    """The fp32 model whose weights are `unet`'s rounded to `dtype`: what layerwise upcasting
    of a `dtype`-stored copy must compute, bit for bit (same fp32 ops on the same values)."""
    reference = copy.deepcopy(unet)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(p.to(dtype).float())
    return reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_storage_computed_in_fp32_equals_fp32_forward_of_the_rounded_weights(dtype):
    torch.manual_seed(0)
    unet = tiny_unet().requires_grad_(False).eval()
    reference = _rounded_fp32(unet, dtype)
    store_frozen(unet, dtype, torch.float32)
    assert all(p.dtype == dtype for p in unet.parameters())
    assert compute_dtype(unet) == torch.float32
    x, t, cond = torch.randn(2, 4, 8, 8), torch.tensor([999, 250]), random_conditioning(2)
    with torch.no_grad():
        out = unet(x, t, **cond.unet_kwargs()).sample
        expected = reference(x, t, **cond.unet_kwargs()).sample
    assert out.dtype == torch.float32
    assert torch.equal(out, expected)
    # After the call the weights are the stored half-precision tensors again.
    assert all(p.dtype == dtype for p in unet.parameters())
    remove_frozen_storage(unet)
    with pytest.raises(RuntimeError):  # no hooks: bf16 weights meet fp32 inputs
        unet(x, t, **cond.unet_kwargs())


def test_lora_on_a_half_stored_base_trains_fp32_adapters_and_keeps_the_stored_tensors():
    torch.manual_seed(0)
    unet = tiny_unet().requires_grad_(False)
    store_frozen(unet, torch.bfloat16, torch.float32)
    stored = {k: v.data_ptr() for k, v in unet.state_dict().items()}
    add_lora(unet, 4, 4.0)
    params = trainable_parameters(unet)
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    cond = random_conditioning(2)
    for _ in range(2):
        loss = unet(torch.randn(2, 4, 8, 8), torch.tensor([999, 499]), **cond.unet_kwargs()).sample.pow(2).mean()
        loss.backward()
        assert torch.isfinite(loss)
        opt.step()
        opt.zero_grad()
    after = {k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items() if "lora_" not in k}
    assert {k: v.data_ptr() for k, v in after.items()} == stored  # nothing replaced the stored weights
    assert all(v.dtype == torch.bfloat16 for v in after.values())
