"""What every export's safetensors metadata says, written and read in one place.

An export carries its format, step count, prediction type, scheduler settings (Euler on the
trailing grid, METHOD.md §6), base model and the run's resolved config, so `train.generate`,
the pipeline loader, the model card and users need nothing else. LoRA files add kohya's `ss_*`
keys that kohya's scripts and A1111 read.

`verify_export` is what every reader of an export runs first (train/pipeline.py): the file
must exist, match the export folder's manifest when that lists it, parse, and hold only
finite tensors. A truncated, emptied or garbled file, or one with a NaN, is refused with a
one-line `DamagedFile` instead of a traceback or an image of NaNs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

from train.config import Config
from train.errors import DamagedFile, UserError
from train.manifest import file_problem, safetensors_problem

UNET_FORMAT = "diffusers_unet"
LORA_FORMAT = "kohya_lora"
CHECKPOINT_FORMAT = "sdxl_single_file"  # original SDXL layout: UNet + VAE + text encoders
SDXL_MODEL_VERSION = "sdxl_base_v1-0"  # kohya's ss_base_model_version for SDXL LoRAs


@dataclass(frozen=True)
class ExportInfo:
    """What an export's safetensors metadata says (everything needed to sample it)."""

    path: Path
    format: str  # UNET_FORMAT | LORA_FORMAT | CHECKPOINT_FORMAT
    num_inference_steps: int
    prediction_type: str  # "epsilon" | "sample" (x0) | "v_prediction"
    scheduler: dict  # EulerDiscreteScheduler overrides: timestep_spacing, prediction_type
    base_model: str  # cfg.model.base (a folder, or digits:tiny / digits:full)
    lora_rank: int  # 0 for UNet exports; the largest per-module rank for LoRAs
    lora_alpha: float  # 0 for UNet exports; alpha of adapter exports, = rank for SVD ones
    lora_names: str  # "" for UNet exports; "original" (kohya SDXL) or "diffusers" module names
    config: dict | None  # the run's resolved config


def scheduler_settings(prediction_type: str) -> dict:
    """The scheduler the exports are distilled for: Euler on the trailing grid (METHOD.md §6)."""
    return {"class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing",
            "prediction_type": prediction_type}


def export_metadata(cfg: Config, steps: int, prediction_type: str, fmt: str,
                    lora: Mapping[str, float] | None = None) -> dict[str, str]:
    """String metadata for one file; `lora` = {"rank", "alpha", "names"} for LoRA files."""
    meta = {
        "format": "pt",  # the safetensors convention other loaders check
        "export_format": fmt,
        "num_inference_steps": str(steps),
        "prediction_type": prediction_type,
        "guidance_scale": "0",
        "scheduler": json.dumps(scheduler_settings(prediction_type)),
        "base_model": cfg.model.base,
        "name": cfg.export.name,
        "config": json.dumps(dataclasses.asdict(cfg)),
    }
    if lora is not None:
        rank, alpha = int(lora["rank"]), float(lora["alpha"])
        # ss_* are the kohya keys its scripts and A1111 read: A1111 takes a LoRA for SDXL only
        # when ss_base_model_version starts with "sdxl_" (the architecture, whatever the base's
        # weights); conv layers are targets too, hence conv_dim/conv_alpha in the network args.
        # Per-module alphas are in the tensors.
        meta.update(lora_rank=str(rank), lora_alpha=repr(alpha), lora_names=str(lora["names"]),
                    ss_network_module="networks.lora", ss_network_dim=str(rank),
                    ss_network_alpha=repr(alpha), ss_base_model_version=SDXL_MODEL_VERSION,
                    ss_v2="False", ss_sd_model_name=cfg.model.base,
                    ss_network_args=json.dumps({"conv_dim": str(rank), "conv_alpha": repr(alpha)}))
    return meta


REEXPORT = ("write it again: python -m train.export RUN_DIR (or re-run training), or copy it "
            "again from where it came from")


def _missing(path: Path) -> UserError:
    return UserError("export file not found", path, "pass the path of a .safetensors file written by train.export")


def read_export_info(path: str | os.PathLike) -> ExportInfo:
    """Parse an export's metadata; fails with a one-line UserError on a missing, unreadable or
    foreign file."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise DamagedFile(f"damaged export: {path.name}: not a readable safetensors file "
                          f"({str(err).splitlines()[0][:120]})", path, REEXPORT) from None
    missing = [k for k in ("export_format", "num_inference_steps", "prediction_type") if k not in meta]
    if missing:
        raise UserError(f"not a train.export file: no {missing} in its safetensors metadata", path,
                        "pass a file written by train.export (its metadata says how to sample it)")
    prediction_type = meta["prediction_type"]
    try:
        return ExportInfo(
            path=path, format=meta["export_format"],
            num_inference_steps=int(meta["num_inference_steps"]), prediction_type=prediction_type,
            scheduler=json.loads(meta.get("scheduler") or json.dumps(scheduler_settings(prediction_type))),
            base_model=meta.get("base_model", ""), lora_rank=int(meta.get("lora_rank", 0)),
            lora_alpha=float(meta.get("lora_alpha", 0.0)), lora_names=meta.get("lora_names", ""),
            config=json.loads(meta["config"]) if "config" in meta else None)
    except ValueError as err:
        raise DamagedFile(f"damaged export: {path.name}: garbled metadata ({err})", path, REEXPORT) from None


def verify_export(path: str | os.PathLike) -> ExportInfo:
    """An export fit to render: present, intact against export/manifest.json (when it lists the
    file), parseable, finite. Reads the whole file once."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    problem = file_problem(path)
    if problem:
        raise DamagedFile(f"damaged export: {problem}", path, REEXPORT)
    info = read_export_info(path)
    problem = safetensors_problem(path)
    if problem:
        raise DamagedFile(f"damaged export: {problem}", path, REEXPORT)
    return info
