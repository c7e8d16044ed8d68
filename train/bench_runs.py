"""The quality benchmarks' trained students (`scripts/bench_quality.py` trains them,
`scripts/bench_plugins.py` reuses them): each variant's recipe, the run directory its resolved
config hashes to, whether that run finished, and its export files.

A variant's run lives at `<runs_root>/<variant>-<sha256 of its resolved config>[:10]`, so a
finished run is found again by any script that resolves the same config, and a changed config
names a new run.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

from distill.phases import direct_adversarial_recipe, lora_track_recipe, mse_only_recipe
from train.config import Config, config_to_yaml

STUDENT_STEPS = (8, 4, 2, 1)

VARIANTS = {
    "ours": lambda cfg: cfg,
    "lora": lambda cfg: replace(cfg, stages=lora_track_recipe(cfg.stages)),
    "mse": lambda cfg: replace(cfg, stages=mse_only_recipe(cfg.stages)),
    **{f"direct-{n}": (lambda cfg, n=n: replace(cfg, stages=direct_adversarial_recipe(cfg.stages, n)))
       for n in (4, 2, 1)},
}


def row_name(variant: str) -> str:
    """The table's model name: the direct-N variants share one ("direct"), one row per N."""
    return variant.split("-")[0]


def run_dir_for(name: str, cfg: Config, runs_root: Path) -> Path:
    """The run directory of variant `name` with resolved config `cfg` (output_dir excluded)."""
    digest = hashlib.sha256(config_to_yaml(replace(cfg, output_dir="-")).encode()).hexdigest()[:10]
    return Path(runs_root) / f"{name}-{digest}"


def run_finished(run: Path, cfg: Config) -> bool:
    """Whether the run's last stage completed (the loop writes its stage.json last)."""
    return (Path(run) / "stages" / f"{cfg.stages[-1].student_steps}step" / "stage.json").is_file()


def export_file(run: Path, prefix: str, steps: int, kind: str) -> Path:
    """The `steps`-step export of a run: its LoRA (kind "lora"), else its UNet file, the
    x0-prediction one where the stage switched to x0."""
    if kind == "lora":
        return run / "export" / f"{prefix}_{steps}step_lora.safetensors"
    x0 = run / "export" / f"{prefix}_{steps}step_unet_x0.safetensors"
    return x0 if x0.is_file() else run / "export" / f"{prefix}_{steps}step_unet.safetensors"


def variant_steps(name: str, cfg: Config) -> list[int]:
    """The benchmarked student step counts (STUDENT_STEPS) that variant `name` distils."""
    stage_steps = {stage.student_steps for stage in VARIANTS[name](cfg).stages}
    return [s for s in STUDENT_STEPS if s in stage_steps]


def variant_exports(name: str, run: Path, cfg: Config) -> list[Path]:
    """The export file of each benchmarked step count of variant `name`'s run: the LoRA file for
    the LoRA track, the UNet file otherwise. A file may be missing (an unfinished stage);
    callers skip those rows."""
    kind = "lora" if name == "lora" else "unet"
    return [export_file(run, cfg.export.name, steps, kind) for steps in variant_steps(name, cfg)]
