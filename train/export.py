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
users need nothing else (METHOD.md §6). The stage final is verified before it is read, no file
with a NaN or Inf is written (an fp16 overflow says to export in bf16), and `export/manifest.json`
records each written file's size and hash, so readers can tell a damaged copy
(train/manifest.py).

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
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor

from distill.lora import (
    extract_lora,
    kohya_state_dict,
    lora_from_adapter,
    lora_target_modules,
)
from train.comfyui import write_workflows
from train.config import DTYPES as EXPORT_DTYPES
from train.config import Config, load_config
from train.embedded import resolve_base
from train.errors import Diverged, UserError, add_debug_flag, run_cli
from train.export_info import (
    CHECKPOINT_FORMAT,
    LORA_FORMAT,
    UNET_FORMAT,
    export_metadata,
    read_export_info,
)
from train.files import atomic_file, disk_full_guard, write_text_atomic
from train.layout import RunLayout
from train.manifest import describe_nonfinite, update_manifest
from train.model_card import write_model_card, write_samples
from train.models import (
    base_unet_files,
    folded_weights,
    is_complete,
    load_student_tensors,
    torch_dtype,
)
from train.sdxl_layout import lora_file_names
from train.single_file import single_file_tensors
from train.tensor_files import LazyTensors, MappedTensors, NonFiniteTensors, write_safetensors

log = logging.getLogger(__name__)

EXACT_REL_ERROR = 1e-5  # below this relative error the report calls an SVD LoRA exact


# ----------------------------------------------------------------------------- a stage's files


def _atomic_save(tensors: Mapping[str, Tensor], path: Path, metadata: dict[str, str],
                 dtype: torch.dtype | None = None) -> None:
    """Write `tensors` (cast to `dtype`) tensor by tensor (train/tensor_files.py): the peak is
    one tensor, however large the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    update_manifest(path.parent, drop=[path])
    with atomic_file(path) as tmp:
        try:
            write_safetensors(tmp, tensors, metadata=metadata, dtype=dtype)
        except NonFiniteTensors as err:  # finite fp32 weights beyond ±65504 overflow in fp16
            raise Diverged(f"export would hold {describe_nonfinite(err.names)}", path,
                           "nothing was written: export in bf16 or fp32 (--dtype bf16) if the fp16 "
                           "cast overflows, else re-train the stage") from None
    update_manifest(path.parent, add=[path])


def _base_unet_weights(cfg: Config) -> tuple[UNet2DConditionModel, Mapping[str, Tensor]]:
    """The base UNet's modules on the meta device (names, targets) and its weights in fp32,
    read one tensor at a time from its files."""
    base_dir = resolve_base(cfg.model)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(base_dir), subfolder="unet"))
    weights = MappedTensors(LazyTensors(base_unet_files(base_dir)), lambda _, v: v.float(), torch.float32)
    return unet, weights


def export_stage(run_dir: Path, cfg: Config, stage: int) -> list[Path]:
    """Write the exports of stage `stage` (index into cfg.stages) from its final; main process.

    The weights first, then (export.workflows) a ComfyUI workflow per weights file, then
    (export.model_card) this step count's sample grid and the rewritten model card; last, their
    sizes and hashes in export/manifest.json."""
    written = _export_weights(Path(run_dir), cfg, stage)
    if cfg.export.workflows:
        written += write_workflows(cfg, written)
    if cfg.export.model_card:
        unet = next(p for p in written if p.suffix == ".safetensors"
                    and read_export_info(p).format == UNET_FORMAT)
        written += [write_samples(unet, cfg), write_model_card(Path(run_dir), cfg)]
    export_dir = RunLayout.for_stages(run_dir, cfg.stages).export_dir
    update_manifest(export_dir, add=[p for p in written if p.parent.resolve() == export_dir.resolve()])
    return written


def _export_weights(run_dir: Path, cfg: Config, stage: int) -> list[Path]:
    layout = RunLayout.for_stages(run_dir, cfg.stages)
    steps = cfg.stages[stage].student_steps
    final = layout.stage_final(stage)
    saved, weights, lora = load_student_tensors(final)  # verified and finite, or DamagedFile
    out_dir = layout.export_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype, prefix = torch_dtype(cfg.export.dtype), f"{cfg.export.name}_{steps}step"

    # Every weights mapping below is lazy: W, W + ΔW and the base are read a tensor at a time.
    adapter = None
    if saved.lora_rank:
        adapter = lora_from_adapter(lora, saved.lora_alpha)
        folded = folded_weights(weights, lora, saved.lora_alpha)
    else:
        folded = MappedTensors(weights, lambda _, v: v.float(), torch.float32)

    x0 = saved.prediction_type == "sample"
    unet_path = out_dir / (f"{prefix}_unet_x0.safetensors" if x0 else f"{prefix}_unet.safetensors")
    _atomic_save(folded, unet_path, export_metadata(cfg, steps, saved.prediction_type, UNET_FORMAT), dtype)
    written = [unet_path]
    if cfg.export.single_file:  # UNet + the base's VAE and text encoders, original SDXL layout
        checkpoint_path = out_dir / (f"{prefix}_x0.safetensors" if x0 else f"{prefix}.safetensors")
        _atomic_save(single_file_tensors(folded, resolve_base(cfg.model), dtype), checkpoint_path,
                     export_metadata(cfg, steps, saved.prediction_type, CHECKPOINT_FORMAT), dtype)
        written.append(checkpoint_path)
    if x0:
        log.info("stage %d predicts x0: no LoRA export (see train/export.py)", stage)
        return written

    base_unet, base = _base_unet_weights(cfg)
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
    write_text_atomic(report_path, json.dumps({"file": lora_path.name, **report}, indent=2) + "\n")
    log.info("stage %d LoRA (%s): overall relative error %.3g", stage, report["source"],
             report["overall_rel_error"])
    return written + [lora_path, report_path]


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (holds config.yaml and stages/)")
    parser.add_argument("--stages", type=int, nargs="+", metavar="STEPS",
                        help="student step counts to export (default: every finished stage)")
    parser.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), help="override export.dtype")
    parser.add_argument("--lora-rank", type=int, help="override export.lora_rank (SVD LoRAs)")
    parser.add_argument("--lora-names", choices=("original", "diffusers"), help="override export.lora_names")
    parser.add_argument("--card-only", action="store_true",
                        help="only rewrite export/README.md (the model card) from the files already there")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    with disk_full_guard(args.run_dir):
        return _export_run(args)


def _export_run(args: argparse.Namespace) -> list[Path]:
    if not (args.run_dir / "config.yaml").is_file():
        raise UserError("not a run directory (no config.yaml)", args.run_dir,
                        "pass the output_dir of a training run")
    cfg = load_config(args.run_dir / "config.yaml")
    export_cfg = cfg.export
    if args.dtype:
        export_cfg = dataclasses.replace(export_cfg, dtype=args.dtype)
    if args.lora_rank is not None:
        export_cfg = dataclasses.replace(export_cfg, lora_rank=args.lora_rank)
    if args.lora_names:
        export_cfg = dataclasses.replace(export_cfg, lora_names=args.lora_names)
    cfg = dataclasses.replace(cfg, export=export_cfg)
    layout = RunLayout.for_stages(args.run_dir, cfg.stages)
    if args.card_only:
        if not layout.export_dir.is_dir():
            raise UserError("nothing exported yet", layout.export_dir, "run python -m train.export RUN_DIR first")
        path = write_model_card(args.run_dir, cfg)
        update_manifest(layout.export_dir, add=[path])
        print(path)
        return [path]
    by_steps = {s.student_steps: i for i, s in enumerate(cfg.stages)}
    if args.stages:
        unknown = [n for n in args.stages if n not in by_steps]
        if unknown:
            raise UserError(f"no {unknown}-step stage in this run's recipe", "--stages",
                            f"choose among {sorted(by_steps)}")
        indices = [by_steps[n] for n in args.stages]
    else:
        indices = [i for i in range(len(cfg.stages)) if is_complete(layout.stage_final(i))]
    written = []
    for index in indices:
        final = layout.stage_final(index)
        if not is_complete(final):
            raise UserError(f"no finished student for the {cfg.stages[index].student_steps}-step stage",
                            final, "train that stage first (re-run the training command)")
        written += export_stage(args.run_dir, cfg, index)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    sys.exit(run_cli(main))
