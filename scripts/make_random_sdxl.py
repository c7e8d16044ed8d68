"""Write SDXL base 1.0's architecture with random weights as a diffusers folder.

    python scripts/make_random_sdxl.py --out DIR [--dtype fp16|bf16|fp32] [--size sdxl|small] [--seed N]

Every component at its published size (UNet 2.57 B parameters, CLIP ViT-L and OpenCLIP bigG
text encoders, the SDXL VAE, its Euler scheduler, locally built 49,408-token CLIP tokenizers);
`StableDiffusionXLPipeline.from_pretrained(DIR)` loads it offline. For timing and memory at
SDXL size, which do not depend on the weights (train/random_sdxl.py). The build peaks at the
fp32 UNet (~10.3 GB RAM); the folder takes ~7 GB in fp16, ~14 GB in fp32.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train.models import torch_dtype  # noqa: E402
from train.random_sdxl import SPECS, build_random_sdxl  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    p.add_argument("--size", default="sdxl", choices=sorted(SPECS), help="sdxl: the real size; small: tests")
    p.add_argument("--dtype", default="fp16", choices=("fp16", "bf16", "fp32"), help="dtype of the saved weights")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    start = time.time()
    report = build_random_sdxl(args.out, SPECS[args.size](), torch_dtype(args.dtype), args.seed)
    print(f"{'component':<16s} {'parameters':>15s}")
    for name, count in report.parameters.items():
        print(f"{name:<16s} {count:>15,d}")
    print(f"wrote {report.path} ({report.dtype}) in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
