"""The adversarial discriminator of METHOD.md §4: a UNet-encoder backbone plus conv heads.

The backbone is a copy of the base UNet's encoder half (input conv, time and SDXL
"text_time" added-condition embeddings, down blocks, mid block), run by a small forward of
its own over diffusers' blocks; the up blocks are never copied. Heads turn encoder features
into one logit per sample, one set of heads per timestep bucket of the judged sample.

    D(x_t, t, x_t', t', c)   conditional:   heads(cat[enc(x_t, t, c), enc(x_t', t', c)])
    D'(x_t', t', c)          unconditional: heads(enc(x_t', t', c))

Pure tensors in, tensors out: no I/O, no devices chosen beyond the UNet's own.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import Tensor, nn

from distill.conditioning import Conditioning

GROUPS = 32  # GroupNorm groups in every head layer (METHOD.md §4)
DEFAULT_BUCKET_EDGES = (125, 375, 625)  # 4 buckets around the re-noise timesteps {10, 250, 500, 750}


@dataclass(frozen=True)
class EncoderFeatures:
    """Encoder activations for a batch: each down block's output, then the mid block's."""

    down: list[Tensor]
    mid: Tensor

    def scales(self, multiscale: bool) -> list[Tensor]:
        """The maps the heads judge: mid first, then every down block's when multiscale."""
        return [self.mid, *self.down] if multiscale else [self.mid]

    def cat(self, other: EncoderFeatures) -> EncoderFeatures:
        """Channel-wise concatenation [self, other] at every scale (the conditional form)."""
        return EncoderFeatures([torch.cat([a, b], 1) for a, b in zip(self.down, other.down)],
                               torch.cat([self.mid, other.mid], 1))


class UNetEncoder(nn.Module):
    """conv_in, embeddings, down blocks and mid block of a diffusers UNet2DConditionModel.

    Computes the time embedding and SDXL's text_time added embedding exactly as
    `UNet2DConditionModel.forward` does, then runs the down and mid blocks; no up blocks.
    With `trainable=False` every parameter has requires_grad False, while gradients still
    flow through the activations to the inputs (the student's output, METHOD.md §4).
    """

    def __init__(self, unet: UNet2DConditionModel, *, trainable: bool, share_weights: bool = False):
        super().__init__()
        _check_supported(unet)
        if share_weights and trainable:
            raise ValueError("share_weights=True needs a frozen backbone (trainable=False): "
                             "training shared modules would change the UNet they belong to")
        take = (lambda m: m) if share_weights else copy.deepcopy
        self.conv_in = take(unet.conv_in)
        self.time_proj = take(unet.time_proj)
        self.time_embedding = take(unet.time_embedding)
        self.time_embed_act = take(unet.time_embed_act) if unet.time_embed_act is not None else None
        text_time = unet.config.addition_embed_type == "text_time"
        self.add_time_proj = take(unet.add_time_proj) if text_time else None
        self.add_embedding = take(unet.add_embedding) if text_time else None
        self.down_blocks = take(unet.down_blocks)
        self.mid_block = take(unet.mid_block)
        self.trainable = trainable
        self.block_out_channels = tuple(unet.config.block_out_channels)
        self.requires_grad_(trainable)

    def requires_grad_(self, requires_grad: bool = True) -> UNetEncoder:
        """Like nn.Module's, except that a frozen backbone stays frozen (so the common
        `discriminator.requires_grad_(True)` after a G step cannot unfreeze it)."""
        return super().requires_grad_(requires_grad and self.trainable)

    def embed(self, x: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The UNet's `emb`: time embedding plus SDXL's text_time embedding (UNet forward §1)."""
        t = torch.as_tensor(t, device=x.device)
        t = (t[None] if t.ndim == 0 else t).expand(x.shape[0])
        # Timesteps carries no weights and always returns fp32; cast as the UNet does.
        emb = self.time_embedding(self.time_proj(t).to(x.dtype))
        if self.add_embedding is not None:
            time_embeds = self.add_time_proj(cond.time_ids.flatten()).reshape(x.shape[0], -1)
            added = torch.cat([cond.pooled_embeds, time_embeds], dim=-1).to(emb.dtype)
            emb = emb + self.add_embedding(added)
        return self.time_embed_act(emb) if self.time_embed_act is not None else emb

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning) -> EncoderFeatures:
        emb = self.embed(x, t, cond)
        h = self.conv_in(x)
        down = []
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=cond.prompt_embeds)
            else:
                h, _ = block(hidden_states=h, temb=emb)
            down.append(h)
        if getattr(self.mid_block, "has_cross_attention", False):
            mid = self.mid_block(h, emb, encoder_hidden_states=cond.prompt_embeds)
        else:
            mid = self.mid_block(h, emb)
        return EncoderFeatures(down, mid)

    def feature_sizes(self, latent_size: int) -> list[int]:
        """Spatial side of [mid, down_0, down_1, ...] for a square latent of `latent_size`."""
        sizes, size = [], latent_size
        for block in self.down_blocks:
            for _ in block.downsamplers or []:
                size = (size + 1) // 2  # 3×3 conv, stride 2, padding 1: ceil(size / 2)
            sizes.append(size)
        return [sizes[-1], *sizes]

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint every diffusers block that supports it (memory for a trainable SDXL backbone)."""
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module._gradient_checkpointing_func = _checkpoint_call
                module.gradient_checkpointing = True


def _checkpoint_call(module: nn.Module, *args):
    return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)


def _check_supported(unet: UNet2DConditionModel) -> None:
    """The small encoder forward covers SDXL-style UNets; refuse what it would silently skip."""
    cfg = unet.config
    problems = []
    if cfg.addition_embed_type not in (None, "text_time"):
        problems.append(f"addition_embed_type={cfg.addition_embed_type!r} (supported: 'text_time', None)")
    if unet.class_embedding is not None:
        problems.append("class embeddings")
    if unet.encoder_hid_proj is not None:
        problems.append("encoder_hid_proj")
    if cfg.center_input_sample:
        problems.append("center_input_sample")
    if unet.mid_block is None:
        problems.append("no mid block")
    if any("lora_" in name for name, _ in unet.named_parameters()):
        problems.append("LoRA layers (pass the original base UNet, METHOD.md §4)")
    if problems:
        raise ValueError("UNetEncoder does not support: " + "; ".join(problems))


class LogitHead(nn.Module):
    """[4×4 conv stride 2 pad 1 → GroupNorm(32) → SiLU] repeated down to 1×1, then a 1×1 conv
    to one logit (METHOD.md §4, the paper's head).

    The number of layers is fixed for a square map of `feature_size`. Other sizes still work:
    a side that would reach 0 is zero-padded to 2 before a layer, and whatever spatial extent
    is left at the end is averaged; at the design size neither happens.
    """

    def __init__(self, in_channels: int, channels: int, feature_size: int, device=None):
        super().__init__()
        if channels % GROUPS:
            raise ValueError(f"head channels must be divisible by {GROUPS} (GroupNorm), got {channels}")
        layers, size, c_in = [], feature_size, in_channels
        while size > 1:
            layers.append(nn.Sequential(
                nn.Conv2d(c_in, channels, 4, stride=2, padding=1, device=device),
                nn.GroupNorm(GROUPS, channels, device=device),
                nn.SiLU(),
            ))
            size, c_in = size // 2, channels  # 4×4, stride 2, padding 1: floor(size / 2)
        self.layers = nn.ModuleList(layers)
        self.out = nn.Conv2d(c_in, 1, 1, device=device)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            pad_w, pad_h = max(0, 2 - x.shape[-1]), max(0, 2 - x.shape[-2])
            x = layer(F.pad(x, (0, pad_w, 0, pad_h)) if pad_w or pad_h else x)
        return self.out(x.mean(dim=(-2, -1), keepdim=True)).flatten()


class Discriminator(nn.Module):
    """D(x_t, t, x_t', t', c) (conditional) or D'(x_t', t', c) (unconditional), METHOD.md §4.

    unet: the original base UNet; its encoder is copied (or shared, see UNetEncoder).
    conditional: judge (x_t, x_t') pairs; the caller computes `encode(x_t, t, c)` once per
        step and passes it as `context` for both the real and the fake x_t'.
    bucket_edges: ascending timesteps splitting t' into len(edges) + 1 buckets, t < edges[0]
        → bucket 0, edges[k−1] ≤ t < edges[k] → bucket k; () is the paper's single head.
    multiscale: heads on every down block's output as well as the mid block; logits of the
        scales are averaged.
    backbone_trainable: False freezes the backbone (METHOD.md §4 default).
    head_channels: width of every head layer (a multiple of 32); None uses the width of the
        features each head reads (2× the UNet's width in the conditional form).
    latent_size: the side of the square latents the heads are sized for (default: the UNet's
        `sample_size`, 128 for SDXL at 1024 px).
    share_weights: reference the UNet's modules instead of copying them (frozen only).

    Heads are created with the global torch RNG on the UNet's device, in fp32.
    """

    def __init__(self, unet: UNet2DConditionModel, *, conditional: bool,
                 bucket_edges: Sequence[int], multiscale: bool, backbone_trainable: bool,
                 head_channels: int | None, latent_size: int | None = None,
                 share_weights: bool = False):
        super().__init__()
        edges = [int(e) for e in bucket_edges]
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(f"bucket_edges must be strictly ascending, got {edges}")
        self.conditional = conditional
        self.multiscale = multiscale
        self.backbone = UNetEncoder(unet, trainable=backbone_trainable, share_weights=share_weights)
        self.register_buffer("bucket_edges", torch.tensor(edges, dtype=torch.long,
                                                          device=unet.device), persistent=False)
        widths = [self.backbone.block_out_channels[-1], *self.backbone.block_out_channels]
        sizes = self.backbone.feature_sizes(latent_size or unet.config.sample_size)
        scales = list(zip(widths, sizes))[: len(widths) if multiscale else 1]
        factor = 2 if conditional else 1
        self.heads = nn.ModuleList(
            nn.ModuleList(LogitHead(factor * w, head_channels or factor * w, s, device=unet.device)
                          for w, s in scales)
            for _ in range(len(edges) + 1)
        )

    @property
    def num_buckets(self) -> int:
        return len(self.heads)

    def bucket(self, t: Tensor) -> Tensor:
        """Bucket index of each timestep (long, same shape as t)."""
        t = torch.as_tensor(t, device=self.bucket_edges.device).long()
        return torch.bucketize(t, self.bucket_edges, right=True)

    def encode(self, x: Tensor, t: Tensor, cond: Conditioning) -> EncoderFeatures:
        """Backbone features of x at t. t = −1 (the clean sample) is embedded as t = 0, the
        nearest noise level the base UNet was trained on."""
        t = torch.as_tensor(t, device=x.device).clamp(min=0)
        return self.backbone(x, t, cond)

    def forward(self, x_next: Tensor, t_next: Tensor, cond: Conditioning,
                context: EncoderFeatures | None = None) -> Tensor:
        """Logits (B,) for the judged samples x_next at t_next; `context` is
        `encode(x_t, t, cond)` in the conditional form and must be None otherwise."""
        if self.conditional != (context is not None):
            raise ValueError("the conditional discriminator needs context=encode(x_t, t, c); "
                             "the unconditional one takes no context")
        features = self.encode(x_next, t_next, cond)
        if context is not None:
            features = context.cat(features)  # METHOD.md §4: [x_t features, x_t' features]
        return self.logits(features, t_next)

    def logits(self, features: EncoderFeatures, t_next: Tensor) -> Tensor:
        """Each sample's logit from its own bucket's heads, mean over scales.

        Every bucket's heads run on every sample and the right one is gathered: a
        differentiable selection that uses every parameter each step (DDP needs no
        `find_unused_parameters`); unselected heads receive zero gradients.
        """
        maps = features.scales(self.multiscale)
        per_bucket = torch.stack(
            [torch.stack([head(m) for head, m in zip(heads, maps)]).mean(0) for heads in self.heads],
            dim=1,
        )  # (B, buckets)
        bucket = self.bucket(t_next).reshape(-1).expand(per_bucket.shape[0])
        return per_bucket.gather(1, bucket.to(per_bucket.device)[:, None]).squeeze(1)

    def requires_grad_(self, requires_grad: bool = True) -> Discriminator:
        """Freeze/unfreeze for the alternating G/D steps; a frozen backbone stays frozen."""
        for heads in self.heads:
            heads.requires_grad_(requires_grad)
        self.backbone.requires_grad_(requires_grad)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the discriminator optimizer should own: heads, plus the backbone if trainable."""
        params = [p for p in self.heads.parameters()]
        return params + (list(self.backbone.parameters()) if self.backbone.trainable else [])
