"""Evaluate a digits model folder, optionally with an export applied: digits-FD, prompt
accuracy, k-NN precision/recall and within-prompt diversity at several step counts, as a
Markdown table (trailing Euler, as the Lightning models are sampled), plus the real digits'
own scores as a reference row (training split scored against the held-out split).

Launch: `python -m train.digits.evaluate --model DIR --steps 32 8 4 2 1 --per-digit 20
[--guidance G] [--export FILE] [--grid docs/digits_{steps}.png]`.
The metrics are `train/digits/metrics.py`'s; this module is only the command line (kept apart
so that importing the package never imports the module `-m` runs).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from train.digits.data import INFO_FILE, digits_images, digits_split, read_model_info
from train.digits.metrics import (
    EvalResult,
    RenderedDigits,
    ensure_digits_classifier,
    held_out_images,
    render_digits,
    score_digits,
)
from train.embedded import check_base_layout
from train.errors import add_debug_flag, run_cli
from train.pipeline import load_pipeline
from train.validation import save_grid


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m train.digits.evaluate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="diffusers SDXL folder (the digits model)")
    p.add_argument("--export", "--unet", default=None,
                   help="optional train.export .safetensors (UNet or LoRA) applied to the model")
    p.add_argument("--prediction-type", default=None, choices=["epsilon", "sample", "v_prediction"],
                   help="default: the export's (its metadata), else the model's scheduler's")
    p.add_argument("--steps", type=int, nargs="+", default=[32, 8, 4, 2, 1])
    p.add_argument("--per-digit", type=int, default=20,
                   help="images per digit (>= 2: diversity compares images of one digit)")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale; default: the model's digits_model.json value")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="save sample grids, e.g. docs/digits_{steps}.png")
    p.add_argument("--cache-root", default=None)
    p.add_argument("--device", default="cpu",
                   help='where the pipeline renders, e.g. "cuda" (the noise is drawn on the CPU either way)')
    add_debug_flag(p)
    args = p.parse_args(argv)
    if args.per_digit < 2:
        p.error(f"--per-digit {args.per_digit}: needs at least 2 images per digit")
    check_base_layout(Path(args.model))  # a one-line error for a wrong folder; the export is
    # verified by load_pipeline

    guidance = args.guidance
    if guidance is None:
        has_info = (Path(args.model) / INFO_FILE).exists()
        guidance = read_model_info(args.model)["guidance_scale"] if has_info else 0.0
    pipe = load_pipeline(args.model, args.export, prediction_type=args.prediction_type, device=args.device)
    classifier = ensure_digits_classifier(args.cache_root)
    real, real_labels = held_out_images()
    data, split = digits_images(), digits_split()
    train_idx = torch.from_numpy(split.train)
    train_real = RenderedDigits(data.images[train_idx].float() / 255, data.labels[train_idx])
    rows = [_row("real (train vs held-out)", "–", score_digits(train_real, 0, 0.0, classifier, real))]
    pipe.set_progress_bar_config(disable=True)
    for steps in args.steps:
        rendered = render_digits(pipe, steps, args.per_digit, guidance, args.seed)
        rows.append(_row(str(steps), f"{guidance:g}",
                         score_digits(rendered, steps, guidance, classifier, real)))
        if args.grid:  # 10 rows (digits) × up to 10 columns of the images just scored
            cols = min(args.per_digit, 10)
            keep = torch.arange(len(rendered.images)) % args.per_digit < cols
            save_grid(rendered.images[keep], args.grid.format(steps=steps), columns=cols, gutter=1)
    print(f"\nmodel: {args.model}  export: {args.export or 'none'}  per digit: {args.per_digit}  "
          f"seed: {args.seed}\n")
    print(f"| steps | guidance | {' | '.join(COLUMNS)} |\n|---|---|{'---|' * len(COLUMNS)}")
    print("\n".join(rows))


COLUMNS = ("FD ↓", "accuracy ↑", "precision ↑", "recall ↑", "diversity")


def _row(steps: str, guidance: str, r: EvalResult) -> str:
    return (f"| {steps} | {guidance} | {r.fd:.3f} | {r.accuracy:.3f} | {r.precision:.3f} | "
            f"{r.recall:.3f} | {r.diversity:.2f} |")


if __name__ == "__main__":
    sys.exit(run_cli(main))
