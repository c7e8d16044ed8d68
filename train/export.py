"""User-facing exports of a run: the files people download (ARCHITECTURE.md "Exports").

For each finished stage (`RUN/stages/<N>step/final/`) this writes to `RUN/export/`:
  <name>_<N>step_unet.safetensors     flat diffusers-key UNet (LoRA folded in), cfg.export.dtype
  <name>_1step_unet_x0.safetensors    the same for an x0-prediction ("sample") student
  <name>_<N>step.safetensors          single-file checkpoint, original SDXL layout: the UNet + the
  <name>_1step_x0.safetensors         base's VAE and text encoders (export.single_file)
  <name>_<N>step_lora.safetensors     LoRA relative to the ORIGINAL base, kohya layout, SDXL names
  <name>_<N>step_lora_report.json     how well that LoRA approximates the stage's weights
  <stem>_comfyui.json                 ComfyUI workflow (API format) per weights file (train/comfyui.py)
  <name>_<N>step_samples.png          a row of samples from the UNet file, shown by the card
  README.md                           the model card, rewritten each time (train/model_card.py)
Every file's safetensors metadata says how to sample it (steps, prediction type, scheduler),
what it was made from (base model, resolved config) and its format, so `train.generate` and
users need nothing else (METHOD.md §6).

Kohya layout: `lora_unet_<module path, "." → "_">.{lora_down.weight,lora_up.weight,alpha}`, with
the original SDXL module paths by default (`export.lora_names: original`,
`lora_unet_input_blocks_4_1_proj_in`; train/sdxl_layout.py derives them from the UNet's
blocks): kohya's SDXL scripts (`sdxl_merge_lora.py`, `--network_weights`), A1111 and ComfyUI map
those names, and diffusers' `load_lora_weights` converts them back (tested through the real
pipeline). `lora_names: diffusers` writes the diffusers paths (`lora_unet_down_blocks_1_…`)
instead, which diffusers and ComfyUI read but kohya's merge tools do not (ARCHITECTURE.md
pitfall 3). `alpha` is stored per module, since the update is (alpha / rank)·up·down
(pitfall 2); the `ss_*` metadata is what kohya's scripts and A1111 read.

The LoRA comes from the LoRA track's adapter when the stage's weights W are still exactly the
base's (the adapter is then relative to the base); otherwise it is extracted from
(W − W_base) by truncated SVD per target layer (METHOD.md §5), with alpha = rank (scale 1) and
the relative Frobenius error per layer and overall written to the report. x0 ("sample")
students get no LoRA: the x0 switch changes what the whole network outputs, a change the
LCM-LoRA target set (no conv_out) cannot carry, and released SDXL-Lightning ships its 1-step
model as a full UNet only.

Launch: python -m train.export RUN_DIR [--stages 8 4] [--dtype fp16|bf16|fp32] [--lora-rank R]
            [--lora-names original|diffusers]
        python -m train.export RUN_DIR --card-only      (rewrite export/README.md alone)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from distill.lora import (
    extract_lora,
    fold_lora,
    kohya_state_dict,
    lora_from_adapter,
    lora_target_modules,
)
from distill.phases import stage_name
from train.config import Config, load_config
from train.files import atomic_file
from train.sdxl_layout import lora_file_names
from train.single_file import single_file_tensors

log = logging.getLogger(__name__)

UNET_FORMAT = "diffusers_unet"
LORA_FORMAT = "kohya_lora"
CHECKPOINT_FORMAT = "sdxl_single_file"  # original SDXL layout: UNet + VAE + text encoders
KOHYA_PREFIX = "lora_unet_"
SDXL_MODEL_VERSION = "sdxl_base_v1-0"  # kohya's ss_base_model_version for SDXL LoRAs
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
EXACT_REL_ERROR = 1e-5  # below this relative error the report calls an SVD LoRA exact


# ----------------------------------------------------------------------------- metadata


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


def read_export_info(path: str | os.PathLike) -> ExportInfo:
    """Parse an export's metadata; fails clearly on files this framework did not write."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    missing = [k for k in ("export_format", "num_inference_steps", "prediction_type") if k not in meta]
    if missing:
        raise ValueError(f"{path}: no {missing} in its safetensors metadata; not a train.export file")
    prediction_type = meta["prediction_type"]
    return ExportInfo(
        path=path, format=meta["export_format"],
        num_inference_steps=int(meta["num_inference_steps"]), prediction_type=prediction_type,
        scheduler=json.loads(meta.get("scheduler") or json.dumps(scheduler_settings(prediction_type))),
        base_model=meta.get("base_model", ""), lora_rank=int(meta.get("lora_rank", 0)),
        lora_alpha=float(meta.get("lora_alpha", 0.0)), lora_names=meta.get("lora_names", ""),
        config=json.loads(meta["config"]) if "config" in meta else None)


# ----------------------------------------------------------------------------- a stage's files


def _atomic_save(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def base_folder(cfg: Config) -> Path:
    """The base model's diffusers folder (an embedded model is built on first use)."""
    from train.models import resolve_base

    return resolve_base(cfg.model)


def _load_base_unet(cfg: Config):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(base_folder(cfg), subfolder="unet",
                                                torch_dtype=torch.float32)


def export_stage(run_dir: Path, cfg: Config, stage: int) -> list[Path]:
    """Write the exports of stage `stage` (index into cfg.stages) from its final; main process.

    The weights first, then (export.workflows) a ComfyUI workflow per weights file, then
    (export.model_card) this step count's sample grid and the rewritten model card."""
    written = _export_weights(Path(run_dir), cfg, stage)
    if cfg.export.workflows:
        from train.comfyui import write_workflows

        written += write_workflows(cfg, written)
    if cfg.export.model_card:
        from train.model_card import write_model_card, write_samples

        unet = next(p for p in written if p.suffix == ".safetensors"
                    and read_export_info(p).format == UNET_FORMAT)
        written += [write_samples(unet, cfg), write_model_card(Path(run_dir), cfg)]
    return written


def _export_weights(run_dir: Path, cfg: Config, stage: int) -> list[Path]:
    from train.models import read_student

    run_dir = Path(run_dir)
    steps = cfg.stages[stage].student_steps
    final = run_dir / "stages" / stage_name(cfg.stages[stage]) / "final"
    saved = read_student(final)
    out_dir = run_dir / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype, prefix = DTYPES[cfg.export.dtype], f"{cfg.export.name}_{steps}step"

    weights = load_file(final / "unet.safetensors")
    adapter = None
    if saved.lora_rank:
        adapter = lora_from_adapter(load_file(final / "lora.safetensors"), saved.lora_alpha)
    folded = fold_lora(weights, adapter) if adapter else {k: v.float() for k, v in weights.items()}

    x0 = saved.prediction_type == "sample"
    unet_path = out_dir / (f"{prefix}_unet_x0.safetensors" if x0 else f"{prefix}_unet.safetensors")
    _atomic_save({k: v.to(dtype).contiguous() for k, v in folded.items()}, unet_path,
                 export_metadata(cfg, steps, saved.prediction_type, UNET_FORMAT))
    written = [unet_path]
    if cfg.export.single_file:  # UNet + the base's VAE and text encoders, original SDXL layout
        checkpoint_path = out_dir / (f"{prefix}_x0.safetensors" if x0 else f"{prefix}.safetensors")
        _atomic_save(single_file_tensors(folded, base_folder(cfg), dtype), checkpoint_path,
                     export_metadata(cfg, steps, saved.prediction_type, CHECKPOINT_FORMAT))
        written.append(checkpoint_path)
    if x0:
        log.info("stage %d predicts x0: no LoRA export (see train/export.py)", stage)
        return written

    base_unet = _load_base_unet(cfg)
    base = {k: v.detach().float() for k, v in base_unet.state_dict().items()}
    if adapter and all(torch.equal(weights[k].float(), base[k]) for k in base):
        layers = adapter  # W is the base: the adapter already is a LoRA of the base
        report = {"source": "adapter", "rank": saved.lora_rank, "alpha": saved.lora_alpha,
                  "overall_rel_error": 0.0, "exact": True,
                  "layers": {m: {"rank": la.rank, "rel_error": 0.0} for m, la in layers.items()}}
        lora_meta = {"rank": saved.lora_rank, "alpha": saved.lora_alpha, "names": cfg.export.lora_names}
    else:
        rank = cfg.export.lora_rank or cfg.student.lora_rank
        device = "cuda" if torch.cuda.is_available() else "cpu"
        extraction = extract_lora(folded, base, lora_target_modules(base_unet), rank, device)
        layers, report = extraction.layers, extraction.report
        max_rank = max((la.rank for la in layers.values()), default=rank)
        lora_meta = {"rank": max_rank, "alpha": max_rank, "names": cfg.export.lora_names}
    file_names = lora_file_names(base_unet, layers, cfg.export.lora_names)
    del base_unet
    if not layers:
        log.warning("stage %d: weights equal the base on every LoRA target; no LoRA written", stage)
        return written
    lora_path = out_dir / f"{prefix}_lora.safetensors"
    _atomic_save(kohya_state_dict({file_names[m]: la for m, la in layers.items()}, dtype), lora_path,
                 export_metadata(cfg, steps, saved.prediction_type, LORA_FORMAT, lora_meta))
    report_path = out_dir / f"{prefix}_lora_report.json"
    report_path.write_text(json.dumps({"file": lora_path.name, **report}, indent=2) + "\n")
    log.info("stage %d LoRA (%s): overall relative error %.3g", stage, report["source"],
             report["overall_rel_error"])
    return written + [lora_path, report_path]


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (holds config.yaml and stages/)")
    parser.add_argument("--stages", type=int, nargs="+", metavar="STEPS",
                        help="student step counts to export (default: every finished stage)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="override export.dtype")
    parser.add_argument("--lora-rank", type=int, help="override export.lora_rank (SVD LoRAs)")
    parser.add_argument("--lora-names", choices=("original", "diffusers"), help="override export.lora_names")
    parser.add_argument("--card-only", action="store_true",
                        help="only rewrite export/README.md (the model card) from the files already there")
    args = parser.parse_args(argv)
    from train.models import is_complete

    cfg = load_config(args.run_dir / "config.yaml")
    export_cfg = cfg.export
    if args.dtype:
        export_cfg = dataclasses.replace(export_cfg, dtype=args.dtype)
    if args.lora_rank is not None:
        export_cfg = dataclasses.replace(export_cfg, lora_rank=args.lora_rank)
    if args.lora_names:
        export_cfg = dataclasses.replace(export_cfg, lora_names=args.lora_names)
    cfg = dataclasses.replace(cfg, export=export_cfg)
    if args.card_only:
        from train.model_card import write_model_card

        if not (args.run_dir / "export").is_dir():
            parser.error(f"{args.run_dir / 'export'}: nothing exported yet")
        path = write_model_card(args.run_dir, cfg)
        print(path)
        return [path]
    by_steps = {s.student_steps: i for i, s in enumerate(cfg.stages)}
    if args.stages:
        unknown = [n for n in args.stages if n not in by_steps]
        if unknown:
            parser.error(f"--stages {unknown}: the recipe's stages are {sorted(by_steps)} steps")
        indices = [by_steps[n] for n in args.stages]
    else:
        indices = [i for i, s in enumerate(cfg.stages)
                   if is_complete(args.run_dir / "stages" / stage_name(s) / "final")]
    written = []
    for index in indices:
        final = args.run_dir / "stages" / stage_name(cfg.stages[index]) / "final"
        if not is_complete(final):
            parser.error(f"{final}: no finished student for the {cfg.stages[index].student_steps}-step stage")
        written += export_stage(args.run_dir, cfg, index)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
