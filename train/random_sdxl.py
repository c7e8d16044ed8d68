"""SDXL base 1.0's published architecture with random weights, as a diffusers folder.

No SDXL weights can be downloaded here, yet timing and memory at SDXL's real size do not
depend on the weights. This builds every component of `stabilityai/stable-diffusion-xl-base-1.0`
from its published configs (UNet; CLIP ViT-L text encoder; OpenCLIP bigG text encoder with
projection; the SDXL VAE; its Euler scheduler) with random weights, and two CLIP byte-level
BPE tokenizers generated locally whose vocabulary is exactly the encoders' 49,408 tokens.
The result loads offline with `StableDiffusionXLPipeline.from_pretrained(DIR)` and with the
framework's own `load_base`.

Launch: `python scripts/make_random_sdxl.py --out DIR [--dtype fp16|bf16|fp32] [--size sdxl|small]`.
`small` is the same code with narrow, shallow widths (`small_spec`), for tests.

Components are built, saved and freed one at a time, so the peak is the fp32 UNet
(~10.3 GB at SDXL size) while it is initialised.
"""

from __future__ import annotations

import gc
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from distill.testing import SDXL_UNET_CONFIG
from train.files import atomic_dir
from train.text import bytes_to_unicode

SDXL_VOCAB_SIZE = 49408  # CLIP's BPE vocabulary: 256 bytes ×2, 48,894 merges, 2 specials
SDXL_MAX_TOKENS = 77  # tokenizer model_max_length = max_position_embeddings

# stabilityai/stable-diffusion-xl-base-1.0 text_encoder/config.json (CLIP ViT-L/14 text tower).
SDXL_TEXT_ENCODER_CONFIG = dict(
    vocab_size=SDXL_VOCAB_SIZE, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=SDXL_MAX_TOKENS, hidden_act="quick_gelu",
    projection_dim=768, layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0,
    initializer_factor=1.0, initializer_range=0.02, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
# text_encoder_2/config.json (OpenCLIP ViT-bigG/14 text tower, CLIPTextModelWithProjection).
SDXL_TEXT_ENCODER_2_CONFIG = dict(
    vocab_size=SDXL_VOCAB_SIZE, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=SDXL_MAX_TOKENS, hidden_act="gelu",
    projection_dim=1280, layer_norm_eps=1e-5, attention_dropout=0.0, dropout=0.0,
    initializer_factor=1.0, initializer_range=0.02, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
# vae/config.json (the SDXL VAE: scaling factor 0.13025, force_upcast for fp16 pipelines).
SDXL_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, sample_size=1024, layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), act_fn="silu", norm_num_groups=32,
    scaling_factor=0.13025, force_upcast=True,
)
# scheduler/scheduler_config.json (EulerDiscreteScheduler; keys the class accepts).
SDXL_EULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    trained_betas=None, prediction_type="epsilon", interpolation_type="linear",
    use_karras_sigmas=False, timestep_spacing="leading", steps_offset=1,
)
# Published parameter counts, which the meta-device build must reproduce (tests check them).
SDXL_PARAMETER_COUNTS = {"unet": 2_567_463_684, "text_encoder": 123_060_480,
                         "text_encoder_2": 694_659_840, "vae": 83_653_863}


@dataclass(frozen=True)
class RandomSDXLSpec:
    """Constructor kwargs of each component (diffusers / transformers config values)."""

    unet: dict = field(default_factory=lambda: dict(SDXL_UNET_CONFIG))
    text_encoder: dict = field(default_factory=lambda: dict(SDXL_TEXT_ENCODER_CONFIG))
    text_encoder_2: dict = field(default_factory=lambda: dict(SDXL_TEXT_ENCODER_2_CONFIG))
    vae: dict = field(default_factory=lambda: dict(SDXL_VAE_CONFIG))
    max_tokens: int = SDXL_MAX_TOKENS  # tokenizer model_max_length


def sdxl_spec() -> RandomSDXLSpec:
    """SDXL base 1.0 exactly."""
    return RandomSDXLSpec()


def small_spec() -> RandomSDXLSpec:
    """The same components and block types, narrow and shallow (tests): UNet widths
    (32, 64, 64), at most 2 transformer layers per block, 2-layer text encoders of widths 64
    and 128, a 4-block VAE of width ≤ 64; the 49,408-token vocabulary and 77 tokens stay."""
    unet = dict(SDXL_UNET_CONFIG, block_out_channels=(32, 64, 64), attention_head_dim=(1, 2, 2),
                transformer_layers_per_block=(1, 2, 2), layers_per_block=1,
                cross_attention_dim=64 + 128, addition_time_embed_dim=32,
                projection_class_embeddings_input_dim=128 + 6 * 32, sample_size=32)
    te1 = dict(SDXL_TEXT_ENCODER_CONFIG, hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=2, projection_dim=64)
    te2 = dict(SDXL_TEXT_ENCODER_2_CONFIG, hidden_size=128, intermediate_size=256,
               num_hidden_layers=2, num_attention_heads=4, projection_dim=128)
    vae = dict(SDXL_VAE_CONFIG, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
               sample_size=256)
    return RandomSDXLSpec(unet, te1, te2, vae)


SPECS = {"sdxl": sdxl_spec, "small": small_spec}


# ----------------------------------------------------------------------------- tokenizers


def clip_vocabulary(vocab_size: int) -> tuple[list[str], list[str]]:
    """(tokens, merges) of a CLIP BPE vocabulary of exactly `vocab_size` tokens.

    Layout as CLIP's: the 256 byte symbols, their `</w>` forms, one token per merge, then
    `<|startoftext|>` and `<|endoftext|>` as the two highest ids (CLIP's pooling reads the
    end token as the argmax id). The merges pair byte symbols, printable ASCII first: any
    text tokenizes; what the tokens mean does not matter for random weights.
    """
    symbols = bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols]
    n_merges = vocab_size - len(tokens) - 2
    if n_merges < 0:
        raise ValueError(f"vocab_size must be at least {len(tokens) + 2}, got {vocab_size}")
    order = sorted(range(256), key=lambda b: (not (chr(b).isalnum() and b < 128), b))
    ends = [symbols[b] + "</w>" for b in order] + [symbols[b] for b in order]
    merges = []
    for left in order:
        for right in ends:
            if len(merges) == n_merges:
                break
            merges.append(f"{symbols[left]} {right}")
        if len(merges) == n_merges:
            break
    if len(merges) < n_merges:
        raise ValueError(f"vocab_size {vocab_size} is larger than this generator reaches")
    tokens += [m.replace(" ", "") for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return tokens, merges


def write_clip_tokenizer(out_dir: Path, vocab_size: int, max_length: int, pad_token: str):
    """Write a CLIPTokenizer folder with `vocab_size` tokens and load it back."""
    from transformers import CLIPTokenizer

    tokens, merges = clip_vocabulary(vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(out_dir / "vocab.json"), merges=str(out_dir / "merges.txt"),
                              model_max_length=max_length, pad_token=pad_token)
    tokenizer.save_pretrained(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir)


# ----------------------------------------------------------------------------- the model


MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "force_zeros_for_empty_prompt": True,
    "add_watermarker": None,
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


@dataclass(frozen=True)
class RandomSDXLReport:
    path: str
    parameters: dict[str, int]  # per component
    dtype: str  # of the saved weights


def build_components(spec: RandomSDXLSpec, *, device: str | torch.device = "cpu"):
    """name → a fresh random-weight component (on `device`; "meta" gives shapes only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    makers = {
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**spec.text_encoder)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**spec.text_encoder_2)),
        "vae": lambda: AutoencoderKL(**spec.vae),
        "unet": lambda: UNet2DConditionModel(**spec.unet),
    }
    for name, make in makers.items():
        with torch.device(device):
            yield name, make()


def build_random_sdxl(out_dir: str | os.PathLike, spec: RandomSDXLSpec | None = None,
                      dtype: torch.dtype = torch.float16, seed: int = 0) -> RandomSDXLReport:
    """Write the diffusers folder at `out_dir` (atomically: a temp sibling renamed at the end)."""
    from diffusers import EulerDiscreteScheduler

    spec, out_dir = spec or sdxl_spec(), Path(out_dir)
    torch.manual_seed(seed)
    counts: dict[str, int] = {}
    with atomic_dir(out_dir) as tmp:
        vocab = spec.text_encoder["vocab_size"]
        if spec.text_encoder_2["vocab_size"] != vocab:
            raise ValueError("both text encoders must share one vocabulary size")
        # SDXL's tokenizer pads with <|endoftext|>, tokenizer_2 (OpenCLIP's) with "!".
        write_clip_tokenizer(tmp / "tokenizer", vocab, spec.max_tokens, "<|endoftext|>")
        write_clip_tokenizer(tmp / "tokenizer_2", vocab, spec.max_tokens, "!")
        for name, module in build_components(spec):
            counts[name] = sum(p.numel() for p in module.parameters())
            module.to(dtype).save_pretrained(tmp / name, safe_serialization=True)
            del module
            gc.collect()
        EulerDiscreteScheduler(**SDXL_EULER_CONFIG).save_pretrained(tmp / "scheduler")
        import diffusers

        index = dict(MODEL_INDEX, _diffusers_version=diffusers.__version__)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return RandomSDXLReport(str(out_dir), counts, str(dtype).removeprefix("torch."))
