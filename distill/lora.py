"""LoRA in one place (METHOD.md §5): the target set, the peft adapter on a live UNet (add,
read, load, merge), the low-rank math on plain tensors (fold, truncated-SVD extraction with
its error), and the kohya key layout the exported files use.

The live adapter is a peft LoRA injected through diffusers' `PeftAdapterMixin`
(`unet.add_adapter`), so the same UNet with `unet.disable_adapters()` is its own base model:
the teacher can reuse it when the teacher equals the LoRA's base. `merge_lora` folds the
adapter into the weights and leaves a plain UNet with the original diffusers keys.

On files, a LoRA is a set of `LoraLayer`s, ΔW = (alpha / rank)·up·down per module, in kohya's
layout: `lora_unet_<diffusers module path, "." → "_">.{lora_down.weight,lora_up.weight,alpha}`.
`alpha` is stored per module, since the update is (alpha / rank)·up·down (ARCHITECTURE.md
pitfall 2). Reading and writing the files is train/export.py's job; nothing here touches disk.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import TimestepEmbedding
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

ADAPTER_NAME = "default"  # peft's default; diffusers' disable/enable_adapters act on all adapters
EXCLUDED_TOP_LEVEL = ("conv_in", "conv_out")
KOHYA_PREFIX = "lora_unet_"
EXACT_REL_ERROR = 1e-5  # below this relative error the report calls an SVD LoRA exact


# --------------------------------------------------------------------------- the live adapter



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


def _lora_layers(unet: nn.Module):
    return (m for m in unet.modules() if isinstance(m, BaseTunerLayer))


# --------------------------------------------------------------------------- kohya layout


def kohya_name(module_path: str) -> str:
    """`down_blocks.0.attentions.0.proj_in` → `lora_unet_down_blocks_0_attentions_0_proj_in`."""
    return KOHYA_PREFIX + module_path.replace(".", "_")


def kohya_lookup(module_names: Iterable[str]) -> dict[str, str]:
    """kohya name → module path for a UNet's modules (`_` alone is ambiguous: `proj_in` vs
    `proj.in`, so the reverse needs the real names). Raises if two modules collide."""
    lookup: dict[str, str] = {}
    for name in module_names:
        if not name:
            continue
        key = kohya_name(name)
        if key in lookup and lookup[key] != name:
            raise ValueError(f"modules {lookup[key]!r} and {name!r} share the kohya name {key!r}")
        lookup[key] = name
    return lookup


def module_path(kohya_key: str, module_names: Iterable[str] | Mapping[str, str]) -> str:
    """The module path of a kohya key (`lora_unet_….lora_down.weight`, `….alpha` or the bare
    name); `module_names` is the UNet's `named_modules()` names or a `kohya_lookup`."""
    lookup = module_names if isinstance(module_names, Mapping) else kohya_lookup(module_names)
    base = kohya_key.split(".", 1)[0]
    if base not in lookup:
        raise KeyError(f"{kohya_key!r} names no module of this UNet")
    return lookup[base]


# --------------------------------------------------------------------------- LoRA math


@dataclass(frozen=True)
class LoraLayer:
    """One module's low-rank update ΔW = (alpha / rank)·up·down, kohya shapes:
    linear down (r, in), up (out, r); conv down (r, in, kh, kw), up (out, r, 1, 1)."""

    down: Tensor
    up: Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> Tensor:
        """ΔW in the weight's shape, float32."""
        shape = (self.up.shape[0], *self.down.shape[1:])
        product = self.up.float().flatten(1) @ self.down.float().flatten(1)
        return (self.alpha / self.rank) * product.reshape(shape)


def lora_from_adapter(state: Mapping[str, Tensor], alpha: float) -> dict[str, LoraLayer]:
    """Per-module LoRA layers from a peft adapter (`<module>.lora_A.weight` = down, `lora_B` = up).

    peft's conv lora_A is Conv2d(in, r, k) and lora_B Conv2d(r, out, 1): kohya's shapes exactly.
    """
    layers = {}
    for key, down in state.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            layers[module] = LoraLayer(down, state[f"{module}.lora_B.weight"], float(alpha))
    if not layers:
        raise ValueError("no peft lora_A/lora_B weights in the adapter state")
    return layers


@dataclass(frozen=True)
class SvdLora:
    layer: LoraLayer
    rel_error: float  # ||ΔW − up·down||_F / ||ΔW||_F
    error_sq: float  # ||ΔW − up·down||_F², for the overall figure
    norm_sq: float  # ||ΔW||_F²


def _top_singular_gram(flat: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """(U_r·S_r, V_rᵀ) of a float64 matrix through the eigenvectors of its smaller Gram matrix.

    Same factors as a truncated SVD (up = U·S, down = Vᵀ with orthonormal rows) at a fraction of
    LAPACK's SVD time on CPU: 7× on SDXL's 1280×11520 conv deltas, 1.7× on square ones. Squaring
    costs precision only for σ_i below ~1e-8·σ_1 in float64, far under anything a rank-r
    approximation keeps.
    """
    m, n = flat.shape
    if n <= m:  # right singular vectors: eig(AᵀA) = V S² Vᵀ; U·S = A·V
        _, v = torch.linalg.eigh(flat.T @ flat)
        down = v[:, -r:].flip(1).T.contiguous()
        return flat @ down.T, down
    # left singular vectors: eig(A·Aᵀ) = U S² Uᵀ, then Vᵀ = S⁻¹·Uᵀ·A
    lam, u = torch.linalg.eigh(flat @ flat.T)
    u, s = u[:, -r:].flip(1), lam[-r:].flip(0).clamp_min(0).sqrt()
    proj = u.T @ flat  # S·Vᵀ
    down = proj / torch.where(s > 0, s, torch.ones_like(s))[:, None]
    return u * s, down


def svd_lora(delta: Tensor, rank: int) -> SvdLora:
    """The best rank-`rank` approximation of ΔW (Eckart–Young), conv weights flattened to
    (out, in·kh·kw) as kohya's extractor does; alpha = rank so the scale is 1.

    Computed in float64 on a CPU, from the eigendecomposition of the smaller Gram matrix, and
    by float32 SVD on a GPU (fast at SDXL size).
    """
    out_features = delta.shape[0]
    work = torch.float64 if delta.device.type == "cpu" else torch.float32
    flat = delta.detach().to(work).reshape(out_features, -1)
    r = max(1, min(rank, *flat.shape))
    if work == torch.float64:
        up, down = _top_singular_gram(flat, r)
    else:
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        up, down = u[:, :r] * s[:r], vh[:r]
    norm_sq = float(flat.square().sum())
    error_sq = float((flat - up @ down).square().sum())
    up_shape = (out_features, r) if delta.ndim == 2 else (out_features, r, 1, 1)
    layer = LoraLayer(down.reshape(r, *delta.shape[1:]).float().cpu(),
                      up.reshape(up_shape).float().cpu(), float(r))
    return SvdLora(layer, math.sqrt(error_sq / norm_sq) if norm_sq else 0.0, error_sq, norm_sq)


def fold_lora(weights: Mapping[str, Tensor], layers: Mapping[str, LoraLayer]) -> dict[str, Tensor]:
    """W + ΔW for every LoRA module (plain diffusers keys), float32."""
    folded = {k: v.float() for k, v in weights.items()}
    for module, layer in layers.items():
        key = f"{module}.weight"
        folded[key] = folded[key] + layer.delta().reshape(folded[key].shape)
    return folded


def kohya_state_dict(layers: Mapping[str, LoraLayer], dtype: torch.dtype) -> dict[str, Tensor]:
    """The kohya file's tensors; alpha stays float32 (a scalar, exact)."""
    state = {}
    for module, layer in sorted(layers.items()):
        name = kohya_name(module)
        state[f"{name}.lora_down.weight"] = layer.down.to(dtype).contiguous()
        state[f"{name}.lora_up.weight"] = layer.up.to(dtype).contiguous()
        state[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return state


@dataclass(frozen=True)
class LoraExtraction:
    layers: dict[str, LoraLayer]
    report: dict


def extract_lora(weights: Mapping[str, Tensor], base: Mapping[str, Tensor], targets: Iterable[str],
                 rank: int, device: torch.device | str = "cpu") -> LoraExtraction:
    """LoRA of (weights − base) over `targets` by truncated SVD, with its error report.

    Target layers whose delta is exactly zero are left out. Parameters outside the target
    weights (biases, norms, conv_in/out, time embeddings) cannot be carried by a LoRA: any
    change there is listed under "uncovered" and counted in "uncovered_rel_norm".
    """
    layers, per_layer, err_sq, norm_sq = {}, {}, 0.0, 0.0
    target_keys = set()
    for module in targets:
        key = f"{module}.weight"
        target_keys.add(key)
        delta = weights[key].to(device, torch.float64 if str(device) == "cpu" else torch.float32)
        delta = delta - base[key].to(delta)
        if not bool(delta.any()):
            continue
        result = svd_lora(delta, rank)
        layers[module] = result.layer
        per_layer[module] = {"rank": result.layer.rank, "rel_error": result.rel_error}
        err_sq, norm_sq = err_sq + result.error_sq, norm_sq + result.norm_sq
    uncovered, uncovered_sq = {}, 0.0
    for key, value in weights.items():
        if key in target_keys:
            continue
        delta = value.double() - base[key].double()
        if bool(delta.any()):
            uncovered_sq += float(delta.square().sum())
            uncovered[key] = float(delta.norm() / base[key].double().norm().clamp_min(1e-30))
    overall = math.sqrt(err_sq / norm_sq) if norm_sq else 0.0
    report = {
        "source": "svd", "rank": rank, "alpha": "= per-layer rank (scale 1)",
        "overall_rel_error": overall,
        "exact": overall < EXACT_REL_ERROR and not uncovered,
        "layers": per_layer, "zero_delta_layers": len(target_keys) - len(per_layer),
        "uncovered": uncovered,
        "uncovered_rel_norm": math.sqrt(uncovered_sq / (norm_sq + uncovered_sq))
        if norm_sq + uncovered_sq else 0.0,
    }
    return LoraExtraction(layers, report)
