"""Write the digits as webdataset shards (img2dataset layout): train and held-out splits.

    python scripts/make_digits_shards.py --out DIR [--seed N] [--shard-size 256]

See train/digits/shards.py for the sample format.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, no install

from train.digits.shards import write_digits_shards
from train.errors import add_debug_flag, run_cli
from train.files import make_output_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="training-sample order seed (the split is fixed)")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard")
    add_debug_flag(p)
    args = p.parse_args()
    make_output_dir(args.out, "--out", "choose a writable folder")
    for key, value in asdict(write_digits_shards(args.out, args.seed, args.shard_size)).items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
