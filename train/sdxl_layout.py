"""The original SDXL checkpoint layout (Stability's `sgm` / `ldm` names) next to diffusers'.

Pure naming, no I/O: dicts of tensors in, dicts of tensors out. Two kinds of files use it:

- LoRAs in kohya's SDXL naming, `lora_unet_<ldm module path, "." → "_">`
  (`lora_unet_input_blocks_4_1_proj_in`, `lora_unet_output_blocks_2_2_conv`,
  `lora_unet_middle_block_1_…`), which kohya's SDXL scripts, A1111 and ComfyUI read;
- single-file checkpoints: `model.diffusion_model.<ldm UNet key>`,
  `conditioner.embedders.0.transformer.<HF CLIP-L key>`, `conditioner.embedders.1.model.<OpenCLIP
  bigG key>`, `first_stage_model.<ldm VAE key>` (ComfyUI / A1111 checkpoint loaders,
  diffusers' `from_single_file`).

The UNet mapping is derived from the UNet's own blocks, not from a table typed for SDXL's
sizes, so the same code names the real SDXL UNet (9 input blocks, 9 output blocks) and the
tiny digits UNet (fewer blocks and layers). The ldm UNet numbers its blocks in one sequence:
`input_blocks.0` is conv_in; each down-block layer is one input block holding its resnet
(`.0`) and, if the block has attention, its transformer (`.1`); a downsampler is an input block
of its own (`.0.op`). `middle_block` is resnet, transformer, resnet (`.0`, `.1`, `.2`). Each
up-block layer is one output block (`.0` resnet, `.1` transformer); an up block's upsampler
sits in its last output block after the transformer (`.2.conv`, or `.1.conv` without one).
Inside resnets ldm uses `in_layers.{0,2}`, `emb_layers.1`, `out_layers.{0,3}`,
`skip_connection`; inside transformers the names are diffusers' own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from distill.lora import kohya_lookup

UNET_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPENCLIP_PREFIX = "conditioner.embedders.1.model."
VAE_PREFIX = "first_stage_model."

# diffusers resnet child → ldm ResBlock child
RESNET_CHILDREN = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                   "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# modules outside the block sequence
UNET_TOP_LEVEL = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
                  "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                  "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0",
                  "conv_out": "out.2"}


# ----------------------------------------------------------------------------- UNet


def _unet_block_prefixes(unet: nn.Module) -> dict[str, tuple[str, bool]]:
    """diffusers module prefix → (ldm prefix, is a resnet), walking the UNet's blocks in order."""
    prefixes: dict[str, tuple[str, bool]] = {}
    index = 1  # input_blocks.0 is conv_in
    for b, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None) or []
        for layer in range(len(block.resnets)):
            prefixes[f"down_blocks.{b}.resnets.{layer}"] = (f"input_blocks.{index}.0", True)
            if layer < len(attentions):
                prefixes[f"down_blocks.{b}.attentions.{layer}"] = (f"input_blocks.{index}.1", False)
            index += 1
        if getattr(block, "downsamplers", None):
            prefixes[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", False)
            index += 1
    mid = unet.mid_block
    if mid is None:
        raise ValueError("the UNet has no mid block; the original SDXL layout needs one")
    for i in range(len(mid.resnets)):
        prefixes[f"mid_block.resnets.{i}"] = (f"middle_block.{2 * i}", True)
    for i in range(len(getattr(mid, "attentions", None) or [])):
        prefixes[f"mid_block.attentions.{i}"] = (f"middle_block.{2 * i + 1}", False)
    index = 0
    for b, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None) or []
        for layer in range(len(block.resnets)):
            prefixes[f"up_blocks.{b}.resnets.{layer}"] = (f"output_blocks.{index}.0", True)
            if layer < len(attentions):
                prefixes[f"up_blocks.{b}.attentions.{layer}"] = (f"output_blocks.{index}.1", False)
            index += 1
        if getattr(block, "upsamplers", None):
            slot = 2 if attentions else 1
            prefixes[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{index - 1}.{slot}.conv", False)
    prefixes.update({k: (v, False) for k, v in UNET_TOP_LEVEL.items()})
    return prefixes


def _rename(name: str, prefixes: Mapping[str, tuple[str, bool]]) -> str | None:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):  # longest prefix first
        prefix = ".".join(parts[:cut])
        if prefix in prefixes:
            ldm, is_resnet = prefixes[prefix]
            rest = parts[cut:]
            if is_resnet and rest:
                if rest[0] not in RESNET_CHILDREN:
                    return None
                rest = [RESNET_CHILDREN[rest[0]], *rest[1:]]
            return ".".join([ldm, *rest])
    return None


def unet_ldm_names(unet: nn.Module) -> dict[str, str]:
    """diffusers module path → original (ldm) module path, for every module of `unet` that holds
    parameters of its own (works on a UNet on the meta device).

    Raises if a parameter-holding module has no place in the original layout (a UNet that is
    not SDXL-shaped), or if two modules land on one name.
    """
    prefixes = _unet_block_prefixes(unet)
    names, unmapped = {}, []
    for name, module in unet.named_modules():
        if not name or not any(True for _ in module.parameters(recurse=False)):
            continue
        ldm = _rename(name, prefixes)
        if ldm is None:
            unmapped.append(name)
        else:
            names[name] = ldm
    if unmapped:
        raise ValueError(f"modules without a place in the original SDXL layout: {unmapped[:5]}")
    if len(set(names.values())) != len(names):
        raise ValueError("two diffusers modules map to one original name")
    return names


def _rename_keys(state: Mapping[str, Tensor], module_names: Mapping[str, str]) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        module, _, param = key.rpartition(".")
        if module not in module_names:
            raise KeyError(f"{key!r}: its module has no original name")
        out[f"{module_names[module]}.{param}"] = value
    return out


def unet_to_ldm(state: Mapping[str, Tensor], module_names: Mapping[str, str]) -> dict[str, Tensor]:
    """A diffusers UNet state dict in original keys (no `model.diffusion_model.` prefix)."""
    return _rename_keys(state, module_names)


LORA_NAMINGS = ("original", "diffusers")


def lora_file_names(unet: nn.Module, modules: Iterable[str], naming: str = "original") -> dict[str, str]:
    """LoRA module path (diffusers) → the path a LoRA file spells, which kohya's layout writes as
    `lora_unet_` + path with "." → "_" (distill.lora.kohya_name).

    "original": the SDXL module names kohya's SDXL scripts train and merge with, A1111 maps and
    diffusers' `load_lora_weights` converts back (`lora_unet_input_blocks_4_1_proj_in`);
    "diffusers": the diffusers paths (`lora_unet_down_blocks_1_attentions_0_proj_in`), which
    diffusers and ComfyUI read but kohya's merge/resume tools and A1111 (partly) do not.
    """
    if naming not in LORA_NAMINGS:
        raise ValueError(f"LoRA naming must be one of {LORA_NAMINGS}, got {naming!r}")
    modules = list(modules)
    names = unet_ldm_names(unet) if naming == "original" else {m: m for m in modules}
    out = {m: names[m] for m in modules}
    kohya_lookup(out.values())  # raises if two modules share a kohya name
    return out


# ----------------------------------------------------------------------------- VAE

_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An `AutoencoderKL` state dict in the original (ldm) VAE keys.

    The decoder's up blocks are numbered from the bottom in ldm (`up.{n-1-i}` is diffusers'
    `up_blocks.{i}`); attention projections are 1×1 convs there, linears in diffusers.
    """
    ups = {int(m.group(1)) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    n_up = max(ups) + 1 if ups else 0
    out = {}
    for key, value in state.items():
        new = key.replace(".conv_norm_out.", ".norm_out.")
        new = re.sub(r"\.down_blocks\.(\d+)\.resnets\.", r".down.\1.block.", new)
        new = re.sub(r"\.down_blocks\.(\d+)\.downsamplers\.0\.", r".down.\1.downsample.", new)
        new = re.sub(r"\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f".up.{n_up - 1 - int(m.group(1))}.block.", new)
        new = re.sub(r"\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f".up.{n_up - 1 - int(m.group(1))}.upsample.", new)
        new = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", new)
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        attention = re.match(r"(.*)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", new)
        if attention:
            head, child, param = attention.groups()
            new = f"{head}.mid.attn_1.{_VAE_ATTENTION[child]}.{param}"
            if param == "weight" and child != "group_norm" and value.ndim == 2:
                value = value[:, :, None, None]  # linear → 1×1 conv
        out[new] = value
    return out


# ----------------------------------------------------------------------------- text encoders


def _with_text_model(key: str) -> str:
    """transformers ≥ 5.6 flattens CLIPTextModel (`embeddings.…` instead of `text_model.embeddings.…`);
    the original checkpoint keeps the wrapped names."""
    return key if key.startswith(("text_model.", "text_projection")) else f"text_model.{key}"


def clip_l_to_ldm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CLIP ViT-L text encoder: the original checkpoint stores it in transformers' own layout."""
    return {_with_text_model(k): v for k, v in state.items() if not k.endswith("position_ids")}


_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1",
                   "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def openclip_to_ldm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CLIP bigG text encoder with projection (transformers) in OpenCLIP's layout: q, k, v fused
    into `attn.in_proj_{weight,bias}`, and `text_projection` a (width, dim) matrix used as
    `x @ P`, i.e. the transpose of transformers' Linear weight."""
    state = {_with_text_model(k): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {}
    fused: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in state.items():
        if key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
        elif key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("text_model.final_layer_norm."):
            out["ln_final." + key.rsplit(".", 1)[1]] = value
        elif m := re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key):
            layer, child, param = m.groups()
            if child in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault((layer, param), {})[child.split(".")[1][0]] = value
            elif child in _OPENCLIP_LAYER:
                out[f"transformer.resblocks.{layer}.{_OPENCLIP_LAYER[child]}.{param}"] = value
            else:
                raise KeyError(f"{key!r}: no OpenCLIP name")
        else:
            raise KeyError(f"{key!r}: no OpenCLIP name")
    for (layer, param), qkv in fused.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat(
            [qkv["q"], qkv["k"], qkv["v"]])
    return out

