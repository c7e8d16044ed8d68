"""Text side of the digits model: a locally generated CLIP tokenizer and random CLIP encoders.

SDXL conditions on two frozen CLIP text encoders. Nothing can be downloaded here, so the
tokenizer's byte-level BPE files are generated (every byte symbol, its `</w>` form, merges that
make each prompt word a single token, and CLIP's two specials) and loaded back with the stock
`CLIPTokenizer`; the encoders are the stock transformers classes with random weights, which the
digits UNet learns to read (SDXL keeps its encoders frozen too).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from train.text import bytes_to_unicode

MAX_TOKENS = 16  # tokenizer model_max_length = text encoder max_position_embeddings


def write_tokenizer(out_dir: Path, words: list[str], max_length: int = MAX_TOKENS):
    """Write a CLIP byte-level BPE tokenizer (vocab.json, merges.txt) and load it back.

    Merges build each word left to right ("d i", "di g", …, "digi t</w>"), so every prompt
    word is exactly one token and any other text still tokenizes, byte by byte.
    """
    from transformers import CLIPTokenizer

    symbols = bytes_to_unicode()
    vocab = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in sorted(set(words)):
        parts = list(word)
        parts[-1] += "</w>"
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
                vocab.append(parts[0] + parts[1])
            parts = [parts[0] + parts[1], *parts[2:]]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(vocab=str(out_dir / "vocab.json"), merges=str(out_dir / "merges.txt"),
                              model_max_length=max_length)
    tokenizer.save_pretrained(out_dir)
    return CLIPTokenizer.from_pretrained(out_dir)


def build_text_encoders(tokenizer, hidden_size: int, num_layers: int, projection_dim: int,
                        seed: int):
    """Two random-init CLIP encoders: `CLIPTextModel` and `CLIPTextModelWithProjection`.

    Token embeddings are re-drawn at unit scale: CLIP's init (std 0.02) gives penultimate
    hidden states so small that a from-scratch UNet's cross-attention reads them slowly.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size,
        intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    encoders = (CLIPTextModel(config), CLIPTextModelWithProjection(config))
    for enc in encoders:
        torch.nn.init.normal_(enc.get_input_embeddings().weight, std=1.0)
        enc.requires_grad_(False).eval()
    return encoders
