"""Build the embedded digits teacher (a tiny SDXL-format model) as a diffusers folder.

    python scripts/make_digits_model.py --out DIR [--size tiny|full] [--seed N]
    python scripts/make_digits_model.py [--size full] [--cache-root DIR]   # into the cache

Without --out the model goes to the cache (`$DISTILL_CACHE` or ~/.cache/lightning-distill)
and an existing cached copy is reused. See train/digits/builder.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from train.digits.builder import SPECS, build_digits_model, ensure_digits_model
from train.digits.data import read_model_info
from train.errors import add_debug_flag, run_cli
from train.files import make_output_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output folder (default: the cache, reused)")
    p.add_argument("--size", default="full", choices=sorted(SPECS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-root", default=None, help="cache root (default $DISTILL_CACHE)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; 1 is much faster on a CPU shared with other jobs")
    add_debug_flag(p)
    args = p.parse_args()
    for folder, key in ((args.out, "--out"), (args.cache_root, "--cache-root")):
        if folder is not None:
            make_output_dir(folder, key, "choose a writable folder")
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    if args.out is not None:
        report = asdict(build_digits_model(args.out, args.size, args.seed, args.cache_root))
    else:
        path = ensure_digits_model(args.cache_root, args.size, args.seed)
        report = read_model_info(path)["metrics"] | {"path": str(path)}
    print(json.dumps(report, indent=2))
    print(f"done in {time.time() - start:.1f} s")


if __name__ == "__main__":
    sys.exit(run_cli(main))
