"""Discriminator backbone and heads (METHOD.md §4): tiny UNets on CPU, SDXL shapes on meta."""

from __future__ import annotations

import pytest
import torch

from discriminator.model import Discriminator, EncoderFeatures, LogitHead, UNetEncoder
from distill.conditioning import Conditioning
from distill.losses import nonsaturating_d_loss, nonsaturating_g_loss
from distill.testing import random_conditioning, sdxl_unet_on_meta, tiny_unet

EDGES = (125, 375, 625)


def make(unet=None, **overrides) -> Discriminator:
    torch.manual_seed(1)
    kwargs = dict(conditional=True, bucket_edges=EDGES, multiscale=False,
                  backbone_trainable=False, head_channels=None)
    return Discriminator(unet if unet is not None else tiny_unet(), **{**kwargs, **overrides})


def latents(batch: int, seed: int, size: int = 8) -> torch.Tensor:
    return torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("conditional", [True, False])
def test_sdxl_shapes_on_meta(conditional):
    unet = sdxl_unet_on_meta()
    d = Discriminator(unet, conditional=conditional, bucket_edges=EDGES, multiscale=True,
                      backbone_trainable=False, head_channels=256)
    with torch.device("meta"):
        x = torch.randn(1, 4, 128, 128)  # 1024×1024 px
        cond = Conditioning(torch.randn(1, 77, 2048), torch.randn(1, 1280), torch.randn(1, 6))
        t = torch.tensor([999])
    features = d.encode(x, t, cond)
    assert features.mid.shape == (1, 1280, 32, 32)
    assert [f.shape[1:] for f in features.down] == [(320, 64, 64), (640, 32, 32), (1280, 32, 32)]
    context = features if conditional else None
    assert d(x, torch.tensor([500], device="meta"), cond, context).shape == (1,)
    # heads reach 1×1 from the 32×32 mid map in five stride-2 layers (32→16→8→4→2→1)
    assert len(d.heads[0][0].layers) == 5
    assert d.heads[0][0].layers[0][0].in_channels == (2560 if conditional else 1280)


def test_encoder_features_equal_the_unets_own():
    unet = tiny_unet()
    encoder = UNetEncoder(unet, trainable=False)  # before the hooks: copies would carry them
    captured = {}
    hooks = [unet.mid_block.register_forward_hook(lambda m, i, o: captured.update(mid=o))]
    for k, block in enumerate(unet.down_blocks):
        hooks.append(block.register_forward_hook(lambda m, i, o, k=k: captured.update({k: o[0]})))
    x, cond = latents(3, 0), random_conditioning(3, seed=1)
    cond = Conditioning(cond.prompt_embeds, cond.pooled_embeds,
                        cond.time_ids * torch.tensor([[1.0], [0.5], [2.0]]))  # distinct time_ids
    t = torch.tensor([999, 500, 3])
    with torch.no_grad():
        unet(x, t, **cond.unet_kwargs())
        for h in hooks:
            h.remove()
        features = encoder(x, t, cond)
    torch.testing.assert_close(features.mid, captured["mid"], rtol=0, atol=0)
    for k, down in enumerate(features.down):
        torch.testing.assert_close(down, captured[k], rtol=0, atol=0)
    # a scalar timestep broadcasts over the batch, as in the UNet
    with torch.no_grad():
        torch.testing.assert_close(encoder(x, torch.tensor(500), cond).mid[1], features.mid[1])


def test_up_blocks_are_not_part_of_the_discriminator():
    unet = tiny_unet()
    d = make(unet)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    excluded = count(unet.up_blocks) + count(unet.conv_norm_out) + count(unet.conv_out)
    assert count(d.backbone) == count(unet) - excluded
    up_ptrs = {p.data_ptr() for m in (unet.up_blocks, unet.conv_out) for p in m.parameters()}
    assert not up_ptrs & {p.data_ptr() for p in d.parameters()}
    assert not any(n.startswith(("up_blocks", "conv_out", "conv_norm_out"))
                   for n, _ in d.backbone.named_parameters())


def test_backbone_is_a_copy_and_heads_are_fresh():
    unet = tiny_unet()
    d1, d2 = make(unet), make(unet)
    torch.manual_seed(2)
    d3 = Discriminator(unet, conditional=True, bucket_edges=EDGES, multiscale=False,
                       backbone_trainable=False, head_channels=None)
    torch.testing.assert_close(d1.backbone.conv_in.weight, unet.conv_in.weight)
    assert d1.backbone.conv_in.weight.data_ptr() != unet.conv_in.weight.data_ptr()
    torch.testing.assert_close(d1.heads[0][0].out.weight, d2.heads[0][0].out.weight)  # seeded
    assert not torch.equal(d1.heads[0][0].out.weight, d3.heads[0][0].out.weight)
    # separate buckets are separately initialised
    assert not torch.equal(d1.heads[0][0].out.weight, d1.heads[1][0].out.weight)


def test_share_weights_references_the_unet():
    unet = tiny_unet()
    d = make(unet, share_weights=True)
    assert d.backbone.mid_block is unet.mid_block
    with pytest.raises(ValueError, match="frozen"):
        make(unet, share_weights=True, backbone_trainable=True)


def test_frozen_backbone_passes_gradients_to_the_student_output():
    d, cond = make(), random_conditioning(2)
    x_hat = latents(2, 1).requires_grad_(True)  # stands in for a student output
    context = d.encode(latents(2, 2), torch.tensor([999, 749]), cond)
    d(x_hat, torch.tensor([749, 499]), cond, context).sum().backward()
    assert all(p.grad is None for p in d.backbone.parameters())
    assert all(not p.requires_grad for p in d.backbone.parameters())
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0
    assert d.heads[2][0].out.weight.grad.abs().sum() > 0  # t'=499 → bucket 2
    # the alternating-step idiom cannot unfreeze a frozen backbone
    d.requires_grad_(False)
    assert not any(p.requires_grad for p in d.parameters())
    d.requires_grad_(True)
    assert not any(p.requires_grad for p in d.backbone.parameters())
    assert all(p.requires_grad for p in d.heads.parameters())
    assert {id(p) for p in d.trainable_parameters()} == {id(p) for p in d.heads.parameters()}


def test_trainable_backbone_gets_gradients():
    d, cond = make(backbone_trainable=True), random_conditioning(2)
    context = d.encode(latents(2, 2), torch.tensor([999, 749]), cond)
    d(latents(2, 1), torch.tensor([749, 10]), cond, context).sum().backward()
    assert d.backbone.conv_in.weight.grad.abs().sum() > 0
    assert d.backbone.mid_block.resnets[0].conv1.weight.grad.abs().sum() > 0
    assert len(d.trainable_parameters()) == len(list(d.parameters()))


def test_bucket_edges():
    d = make()
    t = torch.tensor([-1, 0, 10, 124, 125, 250, 374, 375, 624, 625, 750, 999])
    assert d.bucket(t).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    with pytest.raises(ValueError, match="ascending"):
        make(bucket_edges=(375, 125))


@pytest.mark.parametrize("conditional", [True, False])
def test_each_sample_uses_its_own_buckets_head(conditional):
    d, cond = make(conditional=conditional), random_conditioning(4)
    x, t_next = latents(4, 1), torch.tensor([10, 250, 500, 750])
    context = d.encode(latents(4, 2), torch.tensor([999] * 4), cond) if conditional else None
    with torch.no_grad():
        before = d(x, t_next, cond, context)
        d.heads[2][0].out.bias += 1.0  # only bucket 2 (375 ≤ t < 625) changes
        after = d(x, t_next, cond, context)
    torch.testing.assert_close(after - before, torch.tensor([0.0, 0.0, 1.0, 0.0]))
    # gradients reach only the heads of buckets that are present
    d.zero_grad(set_to_none=True)
    d(x, torch.tensor([10, 10, 750, 750]), cond, context).sum().backward()
    grad = [h[0].out.weight.grad.abs().sum().item() for h in d.heads]
    assert grad[0] > 0 and grad[3] > 0 and grad[1] == 0 and grad[2] == 0


def test_one_bucket_is_the_single_head():
    d, cond = make(bucket_edges=()), random_conditioning(3)
    assert d.num_buckets == 1
    assert d.bucket(torch.tensor([-1, 500, 999])).tolist() == [0, 0, 0]
    context = d.encode(latents(3, 2), torch.tensor([999] * 3), cond)
    x = latents(3, 1)
    with torch.no_grad():
        logits = d(x, torch.tensor([10, 500, 999]), cond, context)
        features = context.cat(d.encode(x, torch.tensor([10, 500, 999]), cond))
        torch.testing.assert_close(logits, d.heads[0][0](features.mid))


def test_multiscale_averages_a_head_per_scale():
    unet, cond = tiny_unet(), random_conditioning(2)
    single, multi = make(unet), make(unet, multiscale=True)
    assert len(single.heads[0]) == 1 and len(multi.heads[0]) == 1 + len(unet.down_blocks)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(multi.heads) > count(single.heads)
    x, t_next = latents(2, 1), torch.tensor([10, 10])
    with torch.no_grad():
        context = multi.encode(latents(2, 2), torch.tensor([999, 999]), cond)
        features = context.cat(multi.encode(x, t_next, cond))
        maps = [features.mid, *features.down]
        expected = torch.stack([head(m) for head, m in zip(multi.heads[0], maps)]).mean(0)
        torch.testing.assert_close(multi(x, t_next, cond, context), expected)


def test_conditional_form_sees_x_t_and_checks_context():
    d, cond = make(), random_conditioning(2)
    x, t_next = latents(2, 1), torch.tensor([499, 499])
    with torch.no_grad():
        a = d(x, t_next, cond, d.encode(latents(2, 2), torch.tensor([749, 749]), cond))
        b = d(x, t_next, cond, d.encode(latents(2, 3), torch.tensor([749, 749]), cond))
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="context"):
        d(x, t_next, cond)
    unconditional = make(conditional=False)
    with pytest.raises(ValueError, match="context"):
        unconditional(x, t_next, cond, d.encode(x, t_next, cond))
    assert unconditional.heads[0][0].layers[0][0].in_channels == 64
    assert d.heads[0][0].layers[0][0].in_channels == 128


def test_clean_timestep_is_embedded_as_zero():
    d, cond, x = make(conditional=False), random_conditioning(2), latents(2, 1)
    with torch.no_grad():
        torch.testing.assert_close(d.encode(x, torch.tensor([-1, -1]), cond).mid,
                                   d.encode(x, torch.tensor([0, 0]), cond).mid)


def test_head_widths_and_other_latent_sizes():
    with pytest.raises(ValueError, match="divisible by 32"):
        make(head_channels=48)
    d = make(head_channels=32, multiscale=True)
    assert all(layer[0].out_channels == 32 for h in d.heads[0] for layer in h.layers)
    cond = random_conditioning(2)
    for h, w in [(8, 16), (4, 4), (16, 16)]:  # non-square, smaller, larger than sample_size
        x = torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(0))
        context = d.encode(x, torch.tensor([999, 999]), cond)
        logits = d(x, torch.tensor([10, 900]), cond, context)
        assert logits.shape == (2,) and torch.isfinite(logits).all()


def test_head_reaches_one_by_one():
    head = LogitHead(64, 32, feature_size=32)
    assert len(head.layers) == 5
    assert LogitHead(64, 32, feature_size=1).layers.__len__() == 0
    x = torch.randn(3, 64, 32, 32, generator=torch.Generator().manual_seed(0))
    h = x
    for layer in head.layers:
        h = layer(h)
    assert h.shape == (3, 32, 1, 1) and head(x).shape == (3,)


def test_lora_unet_is_refused():
    from peft import LoraConfig

    unet = tiny_unet()
    unet.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k"]))
    with pytest.raises(ValueError, match="LoRA"):
        make(unet)


def test_d_step_leaves_no_gradient_on_a_detached_student_and_g_step_none_on_d():
    torch.manual_seed(3)
    student = torch.nn.Conv2d(4, 4, 3, padding=1)
    d, cond = make(), random_conditioning(2)
    x_t, t, t_next = latents(2, 1), torch.tensor([999, 749]), torch.tensor([749, 499])
    x_real = latents(2, 2)
    with torch.no_grad():
        context = d.encode(x_t, t, cond)
    x_hat = student(x_t)
    # D step: the fake is detached
    out = nonsaturating_d_loss(d(x_real, t_next, cond, context), d(x_hat.detach(), t_next, cond, context))
    out.loss.backward()
    assert all(p.grad is None for p in student.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.heads.parameters())
    # G step: D frozen, gradients reach the student only
    d.zero_grad(set_to_none=True)
    d.requires_grad_(False)
    nonsaturating_g_loss(d(x_hat, t_next, cond, context)).backward()
    assert all(p.grad is None for p in d.parameters())
    assert student.weight.grad.abs().sum() > 0


def test_encoder_features_cat():
    a = EncoderFeatures([torch.zeros(1, 2, 4, 4)], torch.zeros(1, 3, 2, 2))
    b = EncoderFeatures([torch.ones(1, 5, 4, 4)], torch.ones(1, 7, 2, 2))
    c = a.cat(b)
    assert c.down[0].shape == (1, 7, 4, 4) and c.mid.shape == (1, 10, 2, 2)
    assert c.mid[:, :3].sum() == 0 and c.mid[:, 3:].sum() == 7 * 4


def test_gradient_checkpointing_gives_the_same_gradients():
    unet, cond = tiny_unet(), random_conditioning(2)
    x, t = latents(2, 1), torch.tensor([749, 10])
    grads = []
    for checkpointing in (False, True):
        d = make(unet, conditional=False, backbone_trainable=True)
        if checkpointing:
            d.backbone.enable_gradient_checkpointing()
        d(x, t, cond).sum().backward()
        grads.append(d.backbone.down_blocks[1].resnets[0].conv1.weight.grad)
    assert any(getattr(m, "gradient_checkpointing", False) for m in d.backbone.modules())
    torch.testing.assert_close(grads[0], grads[1])
