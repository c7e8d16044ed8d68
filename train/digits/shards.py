"""The digits as webdataset shards in img2dataset's layout: the default training data.

Each sample is `KEY.png` (32×32 RGB), `KEY.txt` (the prompt, "a handwritten digit seven") and
`KEY.json` (key, caption, width, height, original size, the digit label, the index into
`load_digits`), written in shards of `shard_size` samples: `train-000000.tar …` from the
training split and `eval-000000.tar` (one shard) from the held-out split of `digits_split`, plus
`shards.json` with the counts. Pixels are exactly `digits_images()` (uint8, lossless PNG).

Launch: `python scripts/make_digits_shards.py --out DIR`.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.digits.data import RESOLUTION, digits_images, digits_split, prompt_for
from train.files import build_once, default_cache_root

SHARDS_VERSION = 1  # bump when the layout changes, so caches rebuild
INDEX_FILE = "shards.json"


@dataclass(frozen=True)
class DigitShards:
    train_urls: str  # brace pattern, e.g. ".../train-{000000..000005}.tar" (webdataset expands it)
    eval_urls: str  # brace pattern of the held-out shards
    num_train: int  # samples
    num_eval: int


def _brace(out_dir: Path, prefix: str, num_shards: int) -> str:
    return str(out_dir / f"{prefix}-{{000000..{num_shards - 1:06d}}}.tar")


def _png_bytes(image_chw) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_chw.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def _write_split(out_dir: Path, prefix: str, indices: np.ndarray, shard_size: int) -> int:
    """Write one split's shards; returns the number of shards."""
    import webdataset as wds

    data = digits_images()
    num_shards = max(1, -(-len(indices) // shard_size))
    for shard in range(num_shards):
        with wds.TarWriter(str(out_dir / f"{prefix}-{shard:06d}.tar")) as sink:
            for i, index in enumerate(indices[shard * shard_size: (shard + 1) * shard_size]):
                label = int(data.labels[index])
                key = f"{shard:05d}{i:04d}"  # img2dataset: shard id then position, 9 digits
                sink.write({
                    "__key__": key,
                    "png": _png_bytes(data.images[index]),
                    "txt": prompt_for(label),
                    "json": json.dumps({
                        "key": key, "caption": prompt_for(label), "status": "success",
                        "width": RESOLUTION, "height": RESOLUTION,
                        "original_width": 8, "original_height": 8,
                        "label": label, "index": int(index)}).encode(),
                })
    return num_shards


def write_digits_shards(out_dir: str | os.PathLike, seed: int = 0,
                        shard_size: int = 256) -> DigitShards:
    """Write the train and held-out shards of the canonical `digits_split()` into `out_dir`;
    `seed` only orders the training samples."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = digits_split()
    # Training samples in a seeded random order, so each shard holds every digit.
    train = np.random.default_rng(seed).permutation(split.train)
    n_train = _write_split(out_dir, "train", train, shard_size)
    n_eval = _write_split(out_dir, "eval", split.eval, len(split.eval))  # one shard
    index = {"version": SHARDS_VERSION, "seed": seed, "resolution": RESOLUTION,
             "num_train": len(train), "num_eval": len(split.eval),
             "train_shards": n_train, "eval_shards": n_eval}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return read_digits_shards(out_dir)


def read_digits_shards(out_dir: str | os.PathLike) -> DigitShards:
    """The `DigitShards` of a folder written by `write_digits_shards`."""
    out_dir = Path(out_dir)
    index = json.loads((out_dir / INDEX_FILE).read_text())
    return DigitShards(_brace(out_dir, "train", index["train_shards"]),
                       _brace(out_dir, "eval", index["eval_shards"]),
                       index["num_train"], index["num_eval"])


def ensure_digits_shards(cache_root: str | os.PathLike | None = None,
                         seed: int = 0) -> DigitShards:
    """The cached shards, written first if missing (temp dir + rename, never half-written)."""
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    final = root / f"digits-shards-seed{seed}-v{SHARDS_VERSION}"
    return read_digits_shards(build_once(final, INDEX_FILE, lambda tmp: write_digits_shards(tmp, seed)))
