"""The student of METHOD.md §2 step 4 and §5: its forms (full, LoRA, merged) and its losses.

A student is a diffusers `UNet2DConditionModel` plus what its output means (`prediction_type`).
The LoRA form is a peft adapter injected through diffusers' `PeftAdapterMixin`
(`unet.add_adapter`), so the same UNet with `unet.disable_adapters()` is its own base model:
the teacher can reuse it when the teacher equals the LoRA's base (METHOD.md §5).
`merge_lora` folds the adapter into the weights and leaves a plain UNet whose state dict has
the original diffusers keys, so the full form continues from it and exports load with
`UNet2DConditionModel.load_state_dict` (METHOD.md §6).

Pure tensors in, tensors out: no files, devices or ranks are chosen here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import TimestepEmbedding
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from distill.conditioning import Conditioning
from distill.schedule import NoiseSchedule, Prediction, eps_to_x0, move, to_prediction

ADAPTER_NAME = "default"  # peft's default; diffusers' disable/enable_adapters act on all adapters
EXCLUDED_TOP_LEVEL = ("conv_in", "conv_out")


# --------------------------------------------------------------------------- LoRA form


def lora_target_modules(unet: nn.Module) -> list[str]:
    """Exact module names of the LCM-LoRA target set (METHOD.md §5).

    Every `nn.Conv2d` and `nn.Linear` of the UNet except `conv_in`, `conv_out` and the linears
    inside `TimestepEmbedding` modules. In an SDXL UNet those are `time_embedding` (the sinusoid
    → time vector MLP) and `add_embedding` (the pooled-text + micro-conditioning MLP of
    `addition_embed_type="text_time"`): both are `TimestepEmbedding` instances, and LCM-LoRA's
    list (to_q/k/v, to_out.0, proj_in/out, ff.net.*, conv1/2, conv_shortcut, down/upsampler
    convs, time_emb_proj) leaves both out. The per-resnet `time_emb_proj` linears are targets.
    Excluding the first and last conv keeps the latent interface exactly the base model's.
    """
    if has_lora(unet):
        raise ValueError("the UNet already carries a LoRA; enumerate targets on the plain UNet")
    time_mlps = [name for name, m in unet.named_modules() if isinstance(m, TimestepEmbedding)]
    return [
        name
        for name, module in unet.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
        and name not in EXCLUDED_TOP_LEVEL
        and not any(name.startswith(prefix + ".") for prefix in time_mlps)
    ]


def add_lora(unet: UNet2DConditionModel, rank: int, alpha: float) -> None:
    """Inject a peft LoRA of `rank` and `lora_alpha=alpha` on the LCM-LoRA targets, in place.

    `init_lora_weights=True` makes lora_B zero, so the student starts exactly equal to its base.
    Base weights are frozen (any dtype); only the adapter's lora_A / lora_B train, in float32.
    The effective update is (alpha / rank)·B·A, which is why alpha is stored with every export
    (ARCHITECTURE.md pitfall 2).
    """
    if rank < 1 or alpha <= 0:
        raise ValueError(f"LoRA rank must be >= 1 and alpha > 0, got rank={rank}, alpha={alpha}")
    targets = lora_target_modules(unet)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=True),
        adapter_name=ADAPTER_NAME,
    )
    for module in _lora_layers(unet):
        # Trainable weights stay fp32 even over a bf16/fp16 frozen base (ARCHITECTURE.md
        # pitfall 5): peft creates the adapter in the base's dtype and casts inputs to it.
        for lora in (module.lora_A, module.lora_B):
            lora.float().requires_grad_(True)


def has_lora(unet: nn.Module) -> bool:
    """Whether any peft adapter layer is injected in the UNet."""
    return any(True for _ in _lora_layers(unet))


@dataclass(frozen=True)
class LoraSettings:
    """What a LoRA state dict alone does not say: scale = alpha / rank."""

    rank: int
    alpha: float
    target_modules: tuple[str, ...]


def lora_settings(unet: UNet2DConditionModel) -> LoraSettings:
    """Rank, alpha and targets of the UNet's adapter, read back from its peft config."""
    if not has_lora(unet):
        raise ValueError("the UNet carries no LoRA")
    config = unet.peft_config[ADAPTER_NAME]
    if config.rank_pattern or config.alpha_pattern:
        raise ValueError("per-module rank/alpha patterns are not supported")
    # Not config.target_modules: peft rewrites a long list of exact names into a minimal set
    # of name suffixes ("to_q", "2", ...); the injected layers are the ground truth.
    targets = tuple(n for n, m in unet.named_modules() if isinstance(m, BaseTunerLayer))
    return LoraSettings(config.r, float(config.lora_alpha), targets)


def lora_state_dict(unet: UNet2DConditionModel) -> dict[str, Tensor]:
    """The adapter weights in peft naming (`<module>.lora_A.weight`, `<module>.lora_B.weight`).

    Rank and alpha are not in these tensors' names: read them with `lora_settings`.
    """
    if not has_lora(unet):
        raise ValueError("the UNet carries no LoRA")
    return get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)


def load_lora_state_dict(unet: UNet2DConditionModel, state: dict[str, Tensor]) -> None:
    """Load `lora_state_dict` output into a UNet prepared with `add_lora` (same rank, targets)."""
    result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"LoRA state mismatch: missing {missing[:5]}, "
                         f"unexpected {list(result.unexpected_keys)[:5]}")


def merge_lora(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """Fold the LoRA into the base weights and remove the adapter (METHOD.md §5 "merge").

    In place; returns the same UNet, now plain: no peft layers, the original diffusers
    state-dict keys, every parameter trainable (the full form continues from here). The fold
    happens whether or not the adapter is currently disabled: merging means "apply the LoRA".
    `safe_fusing` makes peft refuse to fold non-finite weights instead of silently poisoning
    the base.
    """
    if not has_lora(unet):
        raise ValueError("the UNet carries no LoRA to merge")
    unet.fuse_lora(lora_scale=1.0, safe_fusing=True)
    unet.unload_lora()
    for attr in ("lora_scale", "_safe_fusing"):  # bookkeeping fuse_lora leaves on the module
        if attr in unet.__dict__:
            delattr(unet, attr)
    unet.requires_grad_(True)
    return unet


def trainable_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer owns: LoRA only after `add_lora`, all after `merge_lora`."""
    return [p for p in unet.parameters() if p.requires_grad]


def _lora_layers(unet: nn.Module):
    return (m for m in unet.modules() if isinstance(m, BaseTunerLayer))


# --------------------------------------------------------------------------- the student


@dataclass(frozen=True)
class StudentStep:
    """One student move (METHOD.md §2 step 4): the end point x_hat and the prediction u."""

    x_hat: Tensor
    pred: Prediction


@dataclass(frozen=True)
class Student:
    """A UNet and the parametrisation of its output ("epsilon", "sample" or "v_prediction")."""

    unet: UNet2DConditionModel
    prediction_type: str = "epsilon"

    def predict(self, schedule: NoiseSchedule, x_t: Tensor, t: Tensor,
                cond: Conditioning) -> Prediction:
        """u = student(x_t, t, c), expressed as (x0, eps)."""
        output = unet_output(self.unet, x_t, t, cond)
        return to_prediction(schedule, x_t, output, t, self.prediction_type)

    def step(self, schedule: NoiseSchedule, x_t: Tensor, t: Tensor, t_next: Tensor,
             cond: Conditioning) -> StudentStep:
        """x_hat = move(x_t, u, t, t') (METHOD.md §2 step 4); t' = −1 gives x_hat = x0(u)."""
        pred = self.predict(schedule, x_t, t, cond)
        return StudentStep(move(schedule, pred, t_next), pred)


def unet_output(unet: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """The raw UNet output for (x_t, t, c), in the UNet's own parametrisation."""
    return unet(x_t, t, **cond.unet_kwargs()).sample


def switch_to_x0(student: Student) -> Student:
    """The same UNet, now read as predicting x0 ("sample") (METHOD.md §3 x0_convert).

    The architecture is unchanged; only the meaning of its output changes, which the
    x0-conversion phase then teaches it. Exports of the result carry prediction_type="sample".
    """
    if student.prediction_type == "sample":
        raise ValueError("the student already predicts x0")
    return Student(student.unet, "sample")


# --------------------------------------------------------------------------- losses


def mse_loss(x_hat: Tensor, x_target: Tensor) -> Tensor:
    """L = mean ||x_hat − x_target||² (METHOD.md §3 "mse"), reduced in float32 under autocast."""
    return (x_hat.float() - x_target.float()).square().mean()


def x0_conversion_loss(student: Student, frozen_eps_unet: nn.Module, schedule: NoiseSchedule,
                       x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """L = mean ||f_student(x_t, t, c) − x0(x_t, eps_ref, t)||² (METHOD.md §3 x0_convert).

    eps_ref = f_frozen(x_t, t, c) from the frozen epsilon copy, without gradients: the student
    learns to output directly the clean sample the epsilon model implies, so the 1-step stage
    starts from an x0 model that agrees with its epsilon ancestor.
    """
    if student.prediction_type != "sample":
        raise ValueError("x0 conversion trains an x0 student: call switch_to_x0 first")
    with torch.no_grad():
        eps_ref = unet_output(frozen_eps_unet, x_t, t, cond)
        x0_ref = eps_to_x0(schedule, x_t, eps_ref, t)
    return mse_loss(unet_output(student.unet, x_t, t, cond), x0_ref)
