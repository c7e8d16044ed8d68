"""LoRA extraction time at SDXL size: LAPACK's SVD (what `svd_lora` ran before) vs `svd_lora`
(float64 eigendecomposition of the smaller Gram matrix on CPU), over the layer shapes of the
UNet's LoRA target set (`distill.lora.lora_target_modules`, the set a stage end's SVD export
extracts).

    python scripts/bench_lora_extraction.py [--spec sdxl|small] [--rank 64] [--threads 2]

Each unique weight shape (conv weights flattened to out × in·kh·kw, as the extraction does) is
timed once each way on a random float64 delta (time does not depend on the values), and the
totals are weighted by how many target layers have that shape: the predicted time of one
whole-UNet extraction on this machine, both ways, measured in one run. The last column checks
that both give the same relative error (Eckart–Young: the discarded spectrum).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.lora import lora_target_modules, svd_lora  # noqa: E402
from train.errors import add_debug_flag, run_cli  # noqa: E402
from train.random_sdxl import SPECS  # noqa: E402


def target_shapes(spec_name: str) -> Counter:
    """(out, in·kh·kw) → number of LoRA target layers of that shape, from the UNet's config
    (built on the meta device: no memory, no weights)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SPECS[spec_name]().unet)
    modules = dict(unet.named_modules())
    return Counter((w.shape[0], math.prod(w.shape[1:]))
                   for w in (modules[name].weight for name in lora_target_modules(unet)))


def time_shape(shape: tuple[int, int], rank: int) -> tuple[float, float, float]:
    """(LAPACK SVD seconds, svd_lora seconds, |rel error difference|) on one random delta."""
    delta = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    start = time.perf_counter()
    s = torch.linalg.svd(delta, full_matrices=False).S
    lapack = time.perf_counter() - start
    start = time.perf_counter()
    result = svd_lora(delta, rank)
    ours = time.perf_counter() - start
    r = min(rank, *shape)
    expected = math.sqrt(float(s[r:].square().sum() / s.square().sum()))
    return lapack, ours, abs(result.rel_error - expected)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", default="sdxl", choices=sorted(SPECS))
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = target_shapes(args.spec)
    print(f"{sum(shapes.values())} target layers, {len(shapes)} shapes, rank {args.rank}, "
          f"{torch.get_num_threads()} threads", flush=True)
    print("| shape (out × in·k·k) | layers | LAPACK SVD s | svd_lora s | speed-up | rel err diff |")
    print("|---|---:|---:|---:|---:|---:|")
    total_lapack = total_ours = 0.0
    worst = 0.0
    for shape, count in sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1] * min(kv[0])):
        lapack, ours, diff = time_shape(shape, args.rank)
        total_lapack, total_ours, worst = total_lapack + count * lapack, total_ours + count * ours, max(worst, diff)
        print(f"| {shape[0]} × {shape[1]} | {count} | {lapack:.3f} | {ours:.3f} | {lapack / ours:.1f}× | "
              f"{diff:.1e} |", flush=True)
    print(f"| **whole UNet** | {sum(shapes.values())} | {total_lapack:.1f} | {total_ours:.1f} | "
          f"**{total_lapack / total_ours:.1f}×** | {worst:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
