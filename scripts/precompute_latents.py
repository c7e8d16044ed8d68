"""Precompute VAE latents and text embeddings of an image dataset into webdataset shards.

    python scripts/precompute_latents.py --model DIR --shards "data/train-{000000..000009}.tar" \
        --out data/latents [--resolution 1024] [--samples-per-shard 1000]

Reads the image shards once, in order (no resampling, no shuffle), encodes latents with the
VAE in float32 (pitfall 5) and captions with both text encoders, and writes
`latents-NNNNNN.tar` shards holding KEY.latents.npy, KEY.prompt_embeds.npy, KEY.pooled.npy,
KEY.time_ids.npy and KEY.txt (numpy arrays, no pickles). Train on them with
`train.data.latent_loader`. Skipped samples are counted and printed at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from train.data import image_loader_single_pass, write_latent_shards  # noqa: E402
from train.embedded import check_base_layout  # noqa: E402
from train.errors import add_debug_flag, run_cli  # noqa: E402
from train.files import make_output_dir  # noqa: E402
from train.text import encode_image_batch, load_text_encoders  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="diffusers SDXL folder (vae, text encoders)")
    p.add_argument("--shards", required=True, help="image shards: path, brace pattern or list")
    p.add_argument("--out", required=True, help="output folder for latents-NNNNNN.tar")
    p.add_argument("--resolution", type=int, default=1024, help="square crop size, pixels")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--random-crop", action="store_true", help="random instead of centre crops")
    p.add_argument("--posterior", choices=("mean", "sample"), default="mean",
                   help="VAE latent: posterior mean, or a sample seeded by --seed")
    p.add_argument("--seed", type=int, default=0, help="for --random-crop and --posterior sample")
    p.add_argument("--embed-dtype", choices=("float32", "float16"), default="float32",
                   help="storage dtype of the text embeddings (latents are always float32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--num-workers", type=int, default=0)
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    check_base_layout(Path(args.model))
    make_output_dir(args.out, "--out", "choose a writable folder for the latent shards")
    # A comma list of paths, unless the commas are inside a brace pattern ("a-{1,2}.tar").
    shards = args.shards if "{" in args.shards else args.shards.split(",")
    text_dtype = torch.float16 if args.device.startswith("cuda") else torch.float32
    encoders = load_text_encoders(args.model, device=args.device, dtype=text_dtype)
    vae = AutoencoderKL.from_pretrained(Path(args.model) / "vae", torch_dtype=torch.float32)
    vae.requires_grad_(False).eval().to(args.device)
    generator = torch.Generator(args.device).manual_seed(args.seed)

    images = image_loader_single_pass(shards, batch_size=args.batch_size,
                                      resolution=args.resolution, rank=0, world_size=1,
                                      center_crop=not args.random_crop, seed=args.seed,
                                      num_workers=args.num_workers)
    bar = tqdm(unit="img", desc="precompute")

    def latent_batches():
        for batch in images:
            yield encode_image_batch(encoders, vae, batch, posterior=args.posterior,
                                     generator=generator)
            bar.update(len(batch.keys))
            bar.set_postfix(skipped=sum(images.skip_counts.values()))

    written = write_latent_shards(latent_batches(), args.out,
                                  samples_per_shard=args.samples_per_shard,
                                  embed_dtype=np.dtype(args.embed_dtype))
    bar.close()
    summary = {"samples": bar.n, "shards": len(written), "skipped": images.skip_counts}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
