"""The memory plan: counts from the meta device, fake-tensor activations, the pure arithmetic
and the options that make a phase fit."""

import pytest
import torch

from distill.lora import add_lora
from distill.testing import SDXL_UNET_CONFIG, TINY_UNET_CONFIG, sdxl_unet_on_meta, tiny_unet
from train.memory_plan import (
    GIB,
    ModelMeasure,
    PlanOptions,
    lora_parameter_count,
    measure_model,
    parse_bytes,
    plan_phase,
    saved_activation_bytes,
    what_fits,
)

M = ModelMeasure(unet_params=1000, lora_params=100, encoder_params=400, text_params=50,
                 vae_params=10, head_params={False: 20, True: 30},
                 student_activations={("full", False): 5000, ("full", True): 500,
                                      ("lora", False): 4000, ("lora", True): 400},
                 encoder_activations={False: 2000, True: 200}, head_activations=7)


def test_parse_bytes():
    assert parse_bytes("80GB") == parse_bytes("80GiB") == 80 * GIB
    assert parse_bytes("512MB") == 512 * 2**20
    with pytest.raises(ValueError):
        parse_bytes("lots")


def test_lora_count_matches_the_injected_adapter():
    unet = tiny_unet()
    expected = lora_parameter_count(unet, 4)
    add_lora(unet, 4, 4.0)
    assert expected == sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)


def test_sdxl_counts_from_the_meta_device_go_into_the_plan():
    unet_params = sum(p.numel() for p in sdxl_unet_on_meta().parameters())
    m = measure_model(SDXL_UNET_CONFIG, 0, 0, latent_size=8, batch_size=1, prompt_len=77, lora_rank=64,
                      head_channels=256, bucket_edges=[125, 375, 625], multiscale=False,
                      autocast_dtype=None)
    assert m.unet_params == unet_params
    full = plan_phase(m, name="mse", kind="mse", form="full", shared_teacher=True, opts=PlanOptions())
    # fp32 AdamW: weights, gradients 4 bytes each, two moments 8 bytes, and the frozen base.
    assert (full.student_weights, full.student_grads, full.optimizer_states) == (
        4 * unet_params, 4 * unet_params, 8 * unet_params)
    assert full.frozen == 4 * unet_params
    assert m.student_activations["full", True] < m.student_activations["full", False]


def test_fake_activations_match_autograd_saved_bytes_on_a_real_forward():
    """The counter is the same code on real tensors: a linear layer keeps its input."""
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    assert saved_activation_bytes(layer, lambda: layer(x), checkpointing=False, autocast_dtype=None) \
        == x.numel() * 4
    unet = tiny_unet()
    m = measure_model(TINY_UNET_CONFIG, 0, 0, latent_size=8, batch_size=2, prompt_len=7, lora_rank=4,
                      head_channels=None, bucket_edges=[500], multiscale=False, autocast_dtype=None)
    assert m.unet_params == sum(p.numel() for p in unet.parameters())
    assert m.student_activations["full", False] > m.student_activations["full", True] > 0


def test_half_precision_storage_computed_in_fp32_counts_the_upcast_weights():
    """frozen_dtype=bf16 without mixed precision (the preset on a CPU): each layer runs on fp32
    upcasts of its bf16 weights, and autograd keeps those upcasts for backward unless the
    student is checkpointed. (The plan's forward used to fail: bf16 bias, fp32 input.)"""
    kwargs = dict(latent_size=8, batch_size=2, prompt_len=7, lora_rank=4, head_channels=None,
                  bucket_edges=[500], multiscale=False, autocast_dtype=None)
    fp32 = measure_model(TINY_UNET_CONFIG, 0, 0, **kwargs)
    bf16 = measure_model(TINY_UNET_CONFIG, 0, 0, frozen_dtype=torch.bfloat16, **kwargs)
    weights = 4 * fp32.unet_params
    assert bf16.student_activations["lora", False] >= fp32.student_activations["lora", False] + weights // 2
    assert bf16.student_activations["lora", True] < bf16.student_activations["lora", False]
    assert bf16.student_activations["full", False] == fp32.student_activations["full", False]


def test_plan_arithmetic_by_form_and_kind():
    opts = PlanOptions(mixed_precision="bf16", frozen_dtype="bf16", backbone_trainable=True)
    lora = plan_phase(M, name="a", kind="adv_conditional", form="lora", shared_teacher=True, opts=opts)
    assert (lora.student_weights, lora.student_grads, lora.optimizer_states, lora.teacher) == (400, 400, 800, 0)
    assert lora.frozen == 50 * 2 + 10 * 4 + 1000 * 2
    assert lora.discriminator_backbone == 400 * 16 and lora.discriminator_heads == 30 * 16
    assert lora.activations == 4000 + 3 * 2000 + 14  # D step: [real; fake] and x_t through the backbone
    full = plan_phase(M, name="b", kind="adv_unconditional", form="full", shared_teacher=False,
                      opts=PlanOptions(mixed_precision="bf16", frozen_dtype="bf16", optimizer="adamw8bit", shards=4))
    assert full.teacher == 2000 and full.optimizer_states == 1000 * 2 // 4 and full.student_grads == 1000
    assert full.activations == 5000 + 2000 + 14  # frozen backbone: only the G step's pass saves
    # A checkpoint holds what trains: the adapter and the heads (+ the trainable backbone).
    assert lora.checkpoint == (100 + 30 + 400) * 12 and full.checkpoint == (1000 + 20) * 6
    # A LoRA student on weights other than the base's holds its own frozen copy of them.
    later = plan_phase(M, name="c", kind="adv_conditional", form="lora", shared_teacher=False, opts=opts,
                       own_weights=True)
    assert later.frozen - lora.frozen == 1000 * 2 and later.teacher == 1000 * 2
    merge = plan_phase(M, name="m", kind="merge", form="lora", shared_teacher=True, opts=opts)
    assert merge.activations == merge.student_grads == 0


def test_what_fits_names_the_first_sufficient_options():
    def evaluate(o):
        return plan_phase(M, name="x", kind="adv_unconditional", form="full", shared_teacher=False, opts=o)

    base = PlanOptions(backbone_trainable=True)
    total = evaluate(base).total
    assert what_fits(evaluate, base, total)[0] == []
    changes, fitted = what_fits(evaluate, base, evaluate(PlanOptions(student_checkpointing=True,
                                                                     backbone_trainable=True)).total)
    assert changes == ["student.gradient_checkpointing=true"]
    changes, fitted = what_fits(evaluate, base, 15000)
    assert changes[-1].startswith(("ZeRO-2 over", "FSDP over")) and fitted.total <= 15000
    assert "does not fit" in what_fits(evaluate, base, 100)[0][-1]
