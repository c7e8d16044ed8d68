"""SDXL text and image encoding: captions → Conditioning, pixels → VAE latents.

Text follows `StableDiffusionXLPipeline.encode_prompt` exactly (tested numerically against
it): each tokenizer pads/truncates to its `model_max_length`; prompt_embeds concatenates the
PENULTIMATE hidden states (hidden_states[-2]) of text_encoder and text_encoder_2 along the
feature axis; pooled_embeds is text_encoder_2's projected pooled output (`text_embeds`).
Empty or dropped captions get all-zero prompt and pooled embeddings, SDXL's
`force_zeros_for_empty_prompt` (the unconditional branch, METHOD.md §2 step 3).

Images are encoded in float32 by default: the SDXL VAE overflows in fp16 (pitfall 5).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import Tensor
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from distill.conditioning import Conditioning
from train.data import ImageBatch, LatentBatch


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible map from the 256 bytes to printable unicode symbols: the alphabet
    of the byte-level BPE vocabularies the project writes for its own CLIP tokenizers."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


@dataclass(frozen=True)
class TextEmbeddings:
    """prompt_embeds (B, L, D1 + D2) and pooled_embeds (B, P) for B captions."""

    prompt_embeds: Tensor
    pooled_embeds: Tensor

    def with_time_ids(self, time_ids: Tensor) -> Conditioning:
        """The embeddings plus micro-conditioning; time_ids stay float32 whatever the text
        encoders' dtype (pitfall 11: bf16 would round 1365 px to 1368)."""
        return Conditioning(self.prompt_embeds, self.pooled_embeds,
                            time_ids.to(self.prompt_embeds.device, torch.float32))


@dataclass
class TextEncoders:
    """Both SDXL tokenizers and (frozen, eval-mode) text encoders."""

    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection

    @property
    def device(self) -> torch.device:
        return self.text_encoder_2.device

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder_2.dtype

    def _ids(self, tokenizer: CLIPTokenizer, captions: list[str]) -> Tensor:
        return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids.to(self.device)

    @torch.no_grad()
    def encode(self, captions: Sequence[str], drop_mask: Tensor | Sequence[bool] | None = None
               ) -> TextEmbeddings:
        """Embed captions; empty (after strip) or dropped (drop_mask True) ones become zeros."""
        captions = list(captions)
        out_1 = self.text_encoder(self._ids(self.tokenizer, captions), output_hidden_states=True)
        out_2 = self.text_encoder_2(self._ids(self.tokenizer_2, captions),
                                    output_hidden_states=True)
        prompt = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
        pooled = out_2.text_embeds
        # Float32 whatever the encoders' dtype (model.frozen_dtype): embeddings are small, and
        # every consumer (autocast student, teacher, pipelines) takes fp32.
        prompt, pooled = prompt.float(), pooled.float()

        zero = torch.tensor([not c.strip() for c in captions], dtype=torch.bool)
        if drop_mask is not None:
            drop = torch.as_tensor(drop_mask, dtype=torch.bool).cpu()
            if drop.shape != zero.shape:
                raise ValueError(f"drop_mask shape {tuple(drop.shape)} != ({len(captions)},)")
            zero |= drop
        zero = zero.to(self.device)
        return TextEmbeddings(torch.where(zero[:, None, None], 0.0, prompt),
                              torch.where(zero[:, None], 0.0, pooled))

    def conditioning(self, captions: Sequence[str], time_ids: Tensor,
                     drop_mask: Tensor | Sequence[bool] | None = None) -> Conditioning:
        """Conditioning for a batch: text embeddings of `captions` plus its (B, 6) time_ids."""
        return self.encode(captions, drop_mask).with_time_ids(time_ids)


def load_text_encoders(model_dir: str | Path, *, device: torch.device | str,
                       dtype: torch.dtype) -> TextEncoders:
    """Tokenizers and frozen text encoders from a diffusers SDXL folder."""
    model_dir = Path(model_dir)
    encoder_1 = CLIPTextModel.from_pretrained(model_dir / "text_encoder", torch_dtype=dtype)
    encoder_2 = CLIPTextModelWithProjection.from_pretrained(model_dir / "text_encoder_2",
                                                            torch_dtype=dtype)
    for encoder in (encoder_1, encoder_2):
        encoder.requires_grad_(False).eval().to(device)
    return TextEncoders(
        tokenizer=CLIPTokenizer.from_pretrained(model_dir / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(model_dir / "tokenizer_2"),
        text_encoder=encoder_1,
        text_encoder_2=encoder_2,
    )


def latent_size(vae: AutoencoderKL, resolution: int) -> int:
    """The latent side length for images of `resolution` px: the VAE halves it per down block
    after the first (SDXL: 1024 px → 128)."""
    return resolution // (2 ** (len(vae.config.block_out_channels) - 1))


@torch.no_grad()
def encode_images(vae: AutoencoderKL, pixels: Tensor, *, dtype: torch.dtype = torch.float32,
                  posterior: str = "mean", generator: torch.Generator | None = None) -> Tensor:
    """Pixels in [-1, 1] (B, 3, H, W) → latents × scaling_factor, returned as float32.

    posterior: "mean" (deterministic) or "sample" (draws with `generator`).
    dtype: the VAE's dtype, float32 unless the VAE is an fp16-safe one (pitfall 5). The VAE is
        not cast here (that would change the caller's module): pass one already in `dtype`.
    """
    if posterior not in ("mean", "sample"):
        raise ValueError(f"posterior must be 'mean' or 'sample', got {posterior!r}")
    vae_dtype = next(vae.parameters()).dtype
    if vae_dtype != dtype:
        raise ValueError(f"VAE is {vae_dtype}, expected {dtype}: load it with torch_dtype={dtype}")
    device = next(vae.parameters()).device
    dist = vae.encode(pixels.to(device, dtype)).latent_dist
    latents = dist.mean if posterior == "mean" else dist.sample(generator=generator)
    shift = getattr(vae.config, "shift_factor", None)  # None for SDXL; SD3/Flux VAEs use one
    if shift is not None:
        latents = latents - shift
    return (latents * vae.config.scaling_factor).float()


@torch.no_grad()
def encode_image_batch(encoders: TextEncoders, vae: AutoencoderKL, batch: ImageBatch, *,
                       vae_dtype: torch.dtype = torch.float32, posterior: str = "mean",
                       generator: torch.Generator | None = None) -> LatentBatch:
    """An ImageBatch as a LatentBatch: VAE latents plus text conditioning (for precomputing)."""
    latents = encode_images(vae, batch.pixels, dtype=vae_dtype, posterior=posterior,
                            generator=generator)
    cond = encoders.conditioning(batch.captions, batch.time_ids)
    return LatentBatch(latents, cond, batch.captions, batch.keys, batch.worker,
                       batch.skip_counts)


def batch_to_latents(batch: ImageBatch | LatentBatch, vae: AutoencoderKL, encoders: TextEncoders, *,
                     vae_dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Conditioning]:
    """(x0 latents, conditioning) on `device` from an image or a precomputed latent batch."""
    if isinstance(batch, LatentBatch):
        return batch.latents.to(device), batch.cond.to(device)
    latents = encode_images(vae, batch.pixels, dtype=vae_dtype)
    cond = encoders.conditioning(batch.captions, batch.time_ids).to(device)
    return latents.to(device), cond
