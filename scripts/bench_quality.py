"""Quality benchmark on the digits model: the paper's claims (METHOD.md §7) at small scale.

    python scripts/bench_quality.py [--per-digit 100] [--runs-root runs/bench] [--out docs]

Trains what is missing (each variant's resolved config is hashed into its run directory, so a
finished run is reused and a changed config trains anew), then evaluates every row through
the exported files and the diffusers pipeline (the code users run), on the same prompts and
seeds, `--per-digit` images per digit (1,000 images per row at the default 100):
  - the teacher at 32, 8, 4, 2, 1 trailing Euler steps with its CFG;
  - ours, full-UNet track (configs/digits.yaml) at 8, 4, 2, 1 steps;
  - ours, LoRA track (every phase a LoRA on the original base, carried across stages; the
    1-step stage stays epsilon-prediction because a LoRA cannot carry the x0 switch) at 8, 4, 2, 1;
  - an MSE-only progressive-distillation baseline: the same stages with every adversarial
    phase replaced by MSE, at 8, 4, 2, 1;
  - on request (`--variants ... direct-4 direct-2 direct-1`), the non-progressive adversarial
    baseline of the mode-coverage claim: one stage straight from the 32-step CFG teacher to 4,
    2 or 1 steps with the adversarial phases, on the same step budget
    (`distill.phases.direct_adversarial_recipe`).
Columns: digits-FD, prompt accuracy, k-NN precision and recall against the held-out digits,
within-prompt diversity as a ratio to teacher-32's, FD ratio to teacher-32, generation time
per image as a ratio to teacher-32 measured in this run. Also writes side-by-side grids.

The mode-coverage table (METHOD.md §7; teacher, ours, MSE-only, direct-adversarial at 4/2/1):
    python scripts/bench_quality.py --variants ours mse direct-4 direct-2 direct-1 --out docs/coverage

Seeds (issue #13): the same variants at several recipe seeds (the seed changes data order,
noise and initialisation; the evaluation's prompts and noise stay fixed), mean ± sd per row and
the targets checked on the mean and on every seed:
    python scripts/bench_quality.py --variants ours mse --train-seeds 0 1 2 --out docs/seeds
    (train the seeds in parallel first with --train-only, one process per seed)

Time on 2 CPU cores: about 30 minutes per training variant (three variants) plus ~10 minutes
of evaluation; with everything trained, evaluation alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.bench_runs import (  # noqa: E402
    STUDENT_STEPS,
    VARIANTS,
    row_name,
    run_dir_for,
    run_finished,
    variant_exports,
)
from train.config import Config, config_to_yaml, load_config  # noqa: E402
from train.digits.data import read_model_info  # noqa: E402
from train.digits.grids import side_by_side  # noqa: E402
from train.digits.metrics import (  # noqa: E402
    classifier_features,
    ensure_digits_classifier,
    held_out_images,
    paired_bootstrap,
    per_image_diversity,
    real_covered,
    render_digits,
    score_features,
)
from train.embedded import cache_root, resolve_base  # noqa: E402
from train.errors import add_debug_flag, run_cli  # noqa: E402
from train.export_info import read_export_info  # noqa: E402
from train.pipeline import load_pipeline  # noqa: E402

TEACHER_STEPS = (32, 8, 4, 2, 1)
DEFAULT_VARIANTS = ("ours", "lora", "mse")


def train_variant(name: str, cfg: Config, runs_root: Path) -> Path:
    out = run_dir_for(name, cfg, runs_root)
    cfg = replace(cfg, output_dir=str(out))
    if run_finished(out, cfg):
        print(f"[bench] {name}: reusing {out}", flush=True)
        return out
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "bench_config.yaml"
    config_path.write_text(config_to_yaml(cfg))
    print(f"[bench] {name}: training into {out}", flush=True)
    subprocess.run([sys.executable, "-m", "train", str(config_path)], cwd=ROOT, check=True)
    return out


# ----------------------------------------------------------------------------- evaluation

@dataclass(frozen=True)
class Row:
    name: str
    steps: int
    fd: float
    accuracy: float
    precision: float
    recall: float
    diversity: float  # within-prompt feature distance; the table shows it / teacher-32's
    seconds_per_image: float
    images: int
    train_seed: int | None = None  # the recipe's seed (config `seed`); None for the teacher


@dataclass(frozen=True)
class CoverageSamples:
    """A row's per-sample coverage values, for paired comparisons between rows (same real
    digits, same prompts and seeds): their means are the row's recall and diversity."""

    real_covered: torch.Tensor  # (real,) 1.0 where a held-out digit lies in the row's k-NN manifold
    diversity: torch.Tensor  # (images,) each image's mean feature distance to its prompt's others


def evaluate_row(name: str, pipe, steps: int, guidance: float, per_digit: int, classifier, real_feats,
                 grid_images: dict, seed: int, coverage: dict | None = None) -> Row:
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    rendered = render_digits(pipe, steps, per_digit, guidance, seed)
    elapsed = time.perf_counter() - start
    gen_feats = classifier_features(classifier, rendered.images)
    result = score_features(gen_feats, rendered.labels, steps, guidance, classifier, real_feats)
    # the first (up to) 4 images of each digit for the side-by-side grid
    shown = min(4, per_digit)
    idx = torch.cat([torch.arange(d * per_digit, d * per_digit + shown) for d in range(10)])
    grid_images[(name, steps)] = rendered.images[idx]
    if coverage is not None:
        coverage[(name, steps)] = CoverageSamples(real_covered(gen_feats, real_feats).double(),
                                                  per_image_diversity(gen_feats, rendered.labels))
    row = Row(name, steps, result.fd, result.accuracy, result.precision, result.recall,
              result.diversity, elapsed / len(rendered.images), len(rendered.images))
    print(f"[bench] {name:>12s} {steps:>2d} steps  FD {row.fd:8.3f}  acc {row.accuracy:.3f}  "
          f"P {row.precision:.3f}  R {row.recall:.3f}  div {row.diversity:.2f}  "
          f"{row.seconds_per_image * 1e3:.2f} ms/img", flush=True)
    return row


_AVERAGED = ("fd", "accuracy", "precision", "recall", "diversity", "seconds_per_image")


def _by_model(rows: list[Row]) -> dict[tuple[str, int], list[Row]]:
    """Rows grouped by (model, steps), in first-seen order: one per training seed."""
    groups: dict[tuple[str, int], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.name, r.steps), []).append(r)
    return groups


def mean_rows(rows: list[Row]) -> list[Row]:
    """One row per (model, steps): the mean over training seeds (the teacher's rows as they are)."""
    return [Row(name, steps, *(statistics.fmean(getattr(r, f) for r in group) for f in _AVERAGED),
                images=group[0].images)
            for (name, steps), group in _by_model(rows).items()]


def _mean_sd(values: list[float], fmt: str) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.fmean(values), fmt)} ± {format(sd, fmt)}"


def seeds_table(rows: list[Row], seeds: list[int]) -> str:
    """Mean ± sample standard deviation over the training seeds, and each seed's FD."""
    ref = next(r for r in rows if r.name == "teacher" and r.steps == 32)
    lines = ["| model | steps | digits-FD ↓ (mean ± sd) | " + " | ".join(f"FD seed {s}" for s in seeds)
             + " | prompt acc ↑ | precision ↑ | recall ↑ | diversity / teacher-32 | FD / teacher-32 |",
             "|---|---:|---:|" + "---:|" * len(seeds) + "---:|---:|---:|---:|---:|"]
    for (name, steps), group in _by_model(rows).items():
        by_seed = {r.train_seed: r for r in group}
        per_seed = [f"{by_seed[s].fd:.1f}" if s in by_seed else ("–" if name != "teacher" else "")
                    for s in seeds]
        fds = [r.fd for r in group]
        lines.append(
            f"| {name} | {steps} | {_mean_sd(fds, '.1f')} | " + " | ".join(per_seed) + " | "
            f"{_mean_sd([100 * r.accuracy for r in group], '.1f')}% | "
            f"{_mean_sd([r.precision for r in group], '.3f')} | {_mean_sd([r.recall for r in group], '.3f')} | "
            f"{statistics.fmean(r.diversity for r in group) / ref.diversity:.2f} | "
            f"{statistics.fmean(fds) / ref.fd:.2f} |")
    return "\n".join(lines)


def seed_targets(rows: list[Row], seeds: list[int]) -> list[str]:
    """The targets on the mean rows and on every seed's rows (the teacher's rows shared); "—"
    where a seed lacks a target's rows."""
    teacher = [r for r in rows if r.name == "teacher"]
    columns = [("mean", dict(targets(mean_rows(rows))))]
    columns += [(f"seed {s}", dict(targets(teacher + [r for r in rows if r.train_seed == s]))) for s in seeds]
    lines = ["| target | " + " | ".join(c for c, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    for name in columns[0][1]:
        cells = [("yes" if checks[name] else "NO") if name in checks else "—" for _, checks in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def table(rows: list[Row]) -> str:
    ref = next(r for r in rows if r.name == "teacher" and r.steps == 32)
    lines = ["| model | steps | digits-FD ↓ | prompt acc ↑ | precision ↑ | recall ↑ | "
             "diversity / teacher-32 | FD / teacher-32 | time / teacher-32 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.steps} | {r.fd:.3f} | {100 * r.accuracy:.1f}% | "
                     f"{r.precision:.3f} | {r.recall:.3f} | {r.diversity / ref.diversity:.2f} | "
                     f"{r.fd / ref.fd:.2f} | {r.seconds_per_image / ref.seconds_per_image:.3f} |")
    return "\n".join(lines)


def coverage_claim(coverage: dict[tuple[str, int], CoverageSamples]) -> list[str]:
    """The paper's mode-coverage expectation (METHOD.md §7) as paired differences with 90 %
    bootstrap intervals: ours-N against direct-N, and each against teacher-32. Recall pairs the
    held-out digits, diversity pairs the images (same prompt and seed); diversity differences
    are in units of teacher-32's diversity. The verdict names a side only when its interval
    excludes 0."""
    ref = coverage.get(("teacher", 32))
    pairs = []
    for n in (4, 2, 1):
        ours, direct = ("ours", n), ("direct", n)
        if ours in coverage and direct in coverage:
            pairs += [(ours, direct), (ours, ("teacher", 32)), (direct, ("teacher", 32))]
    if not pairs or ref is None:
        return []
    scale = ref.diversity.mean()
    lines = ["| comparison | recall difference [90% CI] | higher recall | "
             "diversity difference / teacher-32 [90% CI] | higher diversity |", "|---|---:|---|---:|---|"]

    def cell(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str], unit=1.0) -> str:
        lo, hi = paired_bootstrap(a, b, lambda x, y: (x - y) / unit)
        side = names[0] if lo > 0 else names[1] if hi < 0 else "neither (interval spans 0)"
        return f"{float((a.mean() - b.mean()) / unit):+.3f} [{lo:+.3f}, {hi:+.3f}] | {side}"

    for a, b in pairs:
        names = (f"{a[0]}-{a[1]}", f"{b[0]}-{b[1]}")
        lines.append(f"| {names[0]} − {names[1]} | "
                     f"{cell(coverage[a].real_covered, coverage[b].real_covered, names)} | "
                     f"{cell(coverage[a].diversity, coverage[b].diversity, names, scale)} |")
    return lines


def targets(rows: list[Row]) -> list[tuple[str, bool]]:
    """The issue's targets, checked against this run's rows; a target whose rows this run did
    not produce (e.g. `--teacher-steps 4`, an unfinished export) is left out, not failed."""
    get = {(r.name, r.steps): r for r in rows}
    fd, acc = (lambda key: get[key].fd), (lambda key: get[key].accuracy)
    t32 = ("teacher", 32)
    specs = [
        ("ours-4 FD <= 1.2 x teacher-32 FD", [("ours", 4), t32], lambda: fd(("ours", 4)) <= 1.2 * fd(t32)),
        ("ours-1 FD <= 1.5 x teacher-32 FD", [("ours", 1), t32], lambda: fd(("ours", 1)) <= 1.5 * fd(t32)),
        ("ours-2 beats MSE-2 by >= 25% on FD", [("ours", 2), ("mse", 2)],
         lambda: fd(("ours", 2)) <= 0.75 * fd(("mse", 2))),
        ("ours-1 beats MSE-1 by >= 25% on FD", [("ours", 1), ("mse", 1)],
         lambda: fd(("ours", 1)) <= 0.75 * fd(("mse", 1))),
        ("ours-4 accuracy within 3 points of teacher-32", [("ours", 4), t32],
         lambda: acc(("ours", 4)) >= acc(t32) - 0.03),
    ]
    specs += [(f"ours-{n} beats teacher-{n} on FD", [("ours", n), ("teacher", n)],
               lambda n=n: fd(("ours", n)) < fd(("teacher", n))) for n in STUDENT_STEPS]
    return [(name, check()) for name, needs, check in specs if all(key in get for key in needs)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/digits.yaml"))
    p.add_argument("--override", action="append", default=[], help="dotted.key=value for the base config")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    p.add_argument("--runs-root", default=str(ROOT / "runs/bench"))
    p.add_argument("--per-digit", type=int, default=100)
    p.add_argument("--teacher-steps", type=int, nargs="+", default=list(TEACHER_STEPS),
                   help="the teacher's rows (32, the reference, is always included)")
    p.add_argument("--seed", type=int, default=0, help="the evaluation's seed (prompts' noise)")
    p.add_argument("--train-seeds", type=int, nargs="+", default=None,
                   help="train and evaluate every variant at these recipe seeds (config `seed`); "
                        "the report gives mean ± sd and checks the targets on the mean and on each seed")
    p.add_argument("--train-only", action="store_true",
                   help="train what is missing and stop (e.g. several seeds in parallel processes)")
    p.add_argument("--out", default=str(ROOT / "docs"))
    p.add_argument("--device", default="cpu",
                   help='where the rows render, e.g. "cuda" (the noise is drawn on the CPU either way, so '
                        'only kernel rounding differs; compare rows within one table)')
    add_debug_flag(p)
    args = p.parse_args(argv)

    base_cfg = load_config(args.config, args.override)
    seeds = args.train_seeds or [base_cfg.seed]
    runs = {(name, seed): train_variant(name, VARIANTS[name](replace(base_cfg, seed=seed)), Path(args.runs_root))
            for seed in seeds for name in args.variants}
    if args.train_only:
        return 0
    base_dir = resolve_base(base_cfg.model)
    guidance = float(read_model_info(base_dir).get("guidance_scale", base_cfg.stages[0].guidance_scale))
    classifier = ensure_digits_classifier(cache_root(base_cfg.model))
    real_feats = classifier_features(classifier, held_out_images()[0])  # once, for every row
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    rows: list[Row] = []
    grid_images: dict = {}
    coverage: dict[tuple[str, int], CoverageSamples] = {}  # the first training seed's rows
    teacher = load_pipeline(base_dir, device=args.device)
    for steps in sorted({32, *args.teacher_steps}, reverse=True):
        rows.append(evaluate_row("teacher", teacher, steps, guidance, args.per_digit, classifier, real_feats,
                                 grid_images, args.seed, coverage))
    del teacher
    for (name, seed), run in runs.items():
        first = seed == seeds[0]  # the grid and the paired comparisons show the first seed's students
        shown = grid_images if first else {}
        for path in variant_exports(name, run, base_cfg):
            if not path.is_file():
                print(f"[bench] {name}: no export {path.name}; row skipped", flush=True)
                continue
            pipe, info = load_pipeline(base_dir, path, device=args.device), read_export_info(path)
            row = evaluate_row(row_name(name), pipe, info.num_inference_steps, 0.0, args.per_digit,
                               classifier, real_feats, shown, args.seed, coverage if first else None)
            rows.append(replace(row, train_seed=seed))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    columns = [c for c in [("teacher", 32), ("teacher", 4), ("mse", 4), ("mse", 1), ("ours", 4), ("ours", 1),
                           ("direct", 4), ("direct", 1)] if c in grid_images]
    side_by_side(grid_images, columns, out / "bench_side_by_side.png")
    report = [f"# Digits quality benchmark ({args.per_digit * 10} images per row)\n"]
    has_targets = all(any(r.name == n for r in rows) for n in ("ours", "mse"))
    if len(seeds) > 1:
        report += [f"Training seeds {', '.join(map(str, seeds))}; the evaluation's seed {args.seed} in "
                   "every row. sd = sample standard deviation over the seeds.\n", seeds_table(rows, seeds), ""]
        report += seed_targets(rows, seeds) if has_targets else []
    else:
        report += [table(rows), ""]
        if has_targets:
            report += ["| target | met |", "|---|---|"]
            report += [f"| {name} | {'yes' if ok else 'NO'} |" for name, ok in targets(rows)]
    claim = coverage_claim(coverage)
    if claim:
        report += ["", "Mode coverage (METHOD.md §7; paired 90 % bootstrap intervals"
                   + (f", training seed {seeds[0]}" if len(seeds) > 1 else "") + "):", "", *claim]
    report += ["", "Runs: " + ", ".join(f"{name} (seed {seed}): `{run}`" for (name, seed), run in runs.items())]
    (out / "bench_results.md").write_text("\n".join(report) + "\n")
    (out / "bench_results.json").write_text(json.dumps([r.__dict__ for r in rows], indent=2))
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
