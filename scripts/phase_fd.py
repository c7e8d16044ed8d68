"""Where a digits run got better or worse: the digits-FD of every phase's result.

    python scripts/phase_fd.py RUN [RUN ...] [--per-digit 50] [--device cpu] [--out phases.md]

For each stage of each run (a run directory of `python -m train` on a `digits:*` base), the
previous stage's final (the stage's start) and every phase final of the stage, a LoRA phase's
adapter folded into its weights, rendered at the stage's student step count with guidance off
and scored by the embedded evaluator on the same prompts and noise. The Δ column is the change
from the stage's start, so a phase that broke a run (issue #13: seed 2's 4-step full-UNet
adversarial phase, FD 118 -> 192) shows as a large positive Δ.

A phase whose result equals its predecessor's (a merge, or a 0-step phase) repeats its FD.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.config import load_config  # noqa: E402
from train.digits.metrics import (  # noqa: E402
    classifier_features,
    ensure_digits_classifier,
    held_out_images,
    render_digits,
    score_features,
)
from train.embedded import cache_root, is_embedded, resolve_base  # noqa: E402
from train.errors import UserError, add_debug_flag, run_cli  # noqa: E402
from train.models import folded_weights, load_student_tensors  # noqa: E402
from train.pipeline import load_pipeline  # noqa: E402

STAGE_DIR = re.compile(r"^(\d+)step$")
PHASE_DIR = re.compile(r"^(\d+)_(\w+)$")


@dataclass(frozen=True)
class PhaseResult:
    run: str
    steps: int  # the stage's student step count, at which every row of the stage is rendered
    phase: str  # "start" (the previous stage's final) or "<index>_<kind>"
    fd: float
    accuracy: float
    recall: float


def stage_finals(run: Path) -> list[tuple[int, list[tuple[str, Path]]]]:
    """[(student steps, [(row name, student folder), ...]), ...] in recipe order (most steps
    first); each stage's rows begin with the previous stage's final where there is one."""
    stages = sorted(((int(m.group(1)), d) for d in (run / "stages").iterdir()
                     if d.is_dir() and (m := STAGE_DIR.match(d.name))), reverse=True)
    out, previous = [], None
    for steps, stage in stages:
        phases = sorted((int(m.group(1)), d.name, d / "final") for d in stage.iterdir()
                        if (m := PHASE_DIR.match(d.name)) and (d / "final").is_dir())
        rows = ([("start", previous)] if previous is not None else []) + [(n, f) for _, n, f in phases]
        out.append((steps, rows))
        previous = stage / "final" if (stage / "final").is_dir() else None
    return out


def student_state(final: Path) -> tuple[str, dict]:
    """A saved student's prediction type and UNet state dict, its LoRA folded in (W + ΔW)."""
    saved, weights, lora = load_student_tensors(final)
    if saved.lora_rank:
        weights = folded_weights(weights, lora, saved.lora_alpha)
    return saved.prediction_type, {k: weights[k] for k in weights}


def evaluate_run(run: Path, per_digit: int, device: str, seed: int = 0) -> list[PhaseResult]:
    config = run / "config.yaml"
    if not config.is_file():
        raise UserError("not a run directory: no config.yaml", run, "pass the output_dir of a training run")
    cfg = load_config(config)
    if not is_embedded(cfg.model):
        raise UserError(f"model.base: {cfg.model.base} is not an embedded model", run,
                        "only digits:* runs can be scored (the evaluator knows only the digits)")
    base = resolve_base(cfg.model)
    classifier = ensure_digits_classifier(cache_root(cfg.model))
    real_feats = classifier_features(classifier, held_out_images()[0])  # once, for every row
    results = []
    for steps, rows in stage_finals(run):
        for name, final in rows:
            prediction_type, state = student_state(final)
            pipe = load_pipeline(base, prediction_type=prediction_type, device=device)
            pipe.unet.load_state_dict(state)
            rendered = render_digits(pipe, steps, per_digit, guidance_scale=0.0, seed=seed)
            r = score_features(classifier_features(classifier, rendered.images), rendered.labels, steps, 0.0,
                               classifier, real_feats)
            results.append(PhaseResult(run.name, steps, name, r.fd, r.accuracy, r.recall))
            print(f"[phase_fd] {run.name} {steps}step {name}: FD {r.fd:.1f}", flush=True)
    return results


def table(results: list[PhaseResult]) -> str:
    lines = ["| run | steps | phase | digits-FD ↓ | Δ vs stage start | prompt acc | recall |",
             "|---|---:|---|---:|---:|---:|---:|"]
    start: dict[tuple[str, int], float] = {}
    for r in results:
        start.setdefault((r.run, r.steps), r.fd)  # the stage's first row is its start
        delta = r.fd - start[(r.run, r.steps)]
        lines.append(f"| {r.run} | {r.steps} | {r.phase} | {r.fd:.1f} | {delta:+.1f} | "
                     f"{100 * r.accuracy:.1f}% | {r.recall:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (output_dir of python -m train)")
    p.add_argument("--per-digit", type=int, default=50, help="images per digit per row (>= 2)")
    p.add_argument("--device", default="cpu", help='where the rows render, e.g. "cuda"')
    p.add_argument("--out", type=Path, default=None, help="also write the table to this Markdown file")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if args.per_digit < 2:
        p.error(f"--per-digit {args.per_digit}: needs at least 2 images per digit")
    results = [r for run in args.runs for r in evaluate_run(run, args.per_digit, args.device)]
    report = table(results)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# digits-FD per phase ({args.per_digit * 10} images per row)\n\n{report}\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
