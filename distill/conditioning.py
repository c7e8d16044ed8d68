"""Text conditioning of an SDXL-style UNet, as one small named type.

Every model call in the framework (teacher, student, discriminator backbone) takes the same
three tensors; bundling them keeps signatures short and makes "the unconditional branch"
(all-zero prompt embeddings, METHOD.md §2 step 3, SDXL's `force_zeros_for_empty_prompt`)
one method instead of three tensor manipulations scattered around.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Conditioning:
    """SDXL conditioning for a batch of B samples.

    prompt_embeds: (B, L, D) penultimate hidden states of both text encoders, concatenated on D.
    pooled_embeds: (B, P) pooled (projected) output of text encoder 2.
    time_ids: (B, 6) micro-conditioning (orig_h, orig_w, crop_top, crop_left, target_h, target_w),
        height first (ARCHITECTURE.md pitfall 4).
    """

    prompt_embeds: Tensor
    pooled_embeds: Tensor
    time_ids: Tensor

    @property
    def batch_size(self) -> int:
        return self.prompt_embeds.shape[0]

    def unet_kwargs(self) -> dict:
        """Keyword arguments for `UNet2DConditionModel.forward` (besides sample and timestep)."""
        return {
            "encoder_hidden_states": self.prompt_embeds,
            "added_cond_kwargs": {"text_embeds": self.pooled_embeds, "time_ids": self.time_ids},
        }

    def unconditional(self) -> Conditioning:
        """All-zero prompt embeddings with the same micro-conditioning (SDXL's empty prompt)."""
        return Conditioning(
            torch.zeros_like(self.prompt_embeds), torch.zeros_like(self.pooled_embeds), self.time_ids
        )

    def cat(self, other: Conditioning) -> Conditioning:
        """Stack two batches, e.g. conditional and unconditional for one batched CFG forward."""
        return Conditioning(
            torch.cat([self.prompt_embeds, other.prompt_embeds]),
            torch.cat([self.pooled_embeds, other.pooled_embeds]),
            torch.cat([self.time_ids, other.time_ids]),
        )

    def to(self, device=None, dtype=None) -> Conditioning:
        """Move to a device; only the embeddings change dtype. time_ids are pixel sizes and stay
        float32 (ARCHITECTURE.md pitfall 11): bf16 keeps 8 mantissa bits, so 1365 would become
        1368 and crop 301 become 300, and SDXL's sinusoidal `add_time_proj` would embed another
        image size. diffusers computes that sinusoid in fp32 and casts its output to the UNet's
        dtype itself."""
        return Conditioning(
            self.prompt_embeds.to(device=device, dtype=dtype),
            self.pooled_embeds.to(device=device, dtype=dtype),
            self.time_ids.to(device=device, dtype=torch.float32),
        )

    def index(self, idx) -> Conditioning:
        return Conditioning(self.prompt_embeds[idx], self.pooled_embeds[idx], self.time_ids[idx])
