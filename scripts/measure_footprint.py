"""Host memory of loading, saving and exporting at SDXL size (issue #16), one process per step so
that each peak (VmHWM) is that step's alone.

    python scripts/measure_footprint.py load   --base DIR [--frozen-dtype bf16]
    python scripts/measure_footprint.py final  --base DIR --run RUN      # a LoRA stage final to export
    python scripts/measure_footprint.py export --base DIR --run RUN      # the stage's streaming export
    python scripts/measure_footprint.py step   --base DIR [--phase adv_conditional] [--resolution 256]

`load` loads the base (frozen UNet and text encoders stored in --frozen-dtype, computed in
fp32) and builds a LoRA student on it; `final` also writes a stage final whose adapter is
non-zero; `export` writes that stage's UNet, single-file and LoRA exports tensor by tensor;
`step` times one training step of a LoRA phase with layerwise upcasting. Each prints one JSON
line: seconds, peak and current RSS in GiB, and what it wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
CONFIG = ROOT / "configs/sdxl_lightning.yaml"


def rss_gib() -> dict[str, float]:
    """Peak (VmHWM) and current (VmRSS) resident memory of this process, GiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = round(int(value.split()[0]) * 1024 / GIB, 2)
    return {"peak_rss_gib": fields["VmHWM"], "rss_gib": fields["VmRSS"]}


def _config(args, run: Path | None = None):
    from train.config import load_config

    overrides = [f"model.base={args.base}", f"model.frozen_dtype={args.frozen_dtype}",
                 "runtime.mixed_precision=no", f"data.resolution={args.resolution}", "data.batch_size=1",
                 f"output_dir={run or '/tmp/unused'}", "export.model_card=false", "export.workflows=false"]
    return load_config(CONFIG, overrides)


def _base_and_student(cfg):
    from accelerate import Accelerator

    from train.bench import solo_plan
    from train.build import build_student
    from train.models import load_base, torch_dtype

    acc = Accelerator(cpu=True, mixed_precision="no")
    base = load_base(Path(cfg.model.base), cfg.model, acc.device, torch_dtype(cfg.data.vae_dtype),
                     mixed_precision=cfg.runtime.mixed_precision)
    from distill.phases import expand_recipe

    plan = next(p for p in expand_recipe(cfg.stages, base.prediction_type) if p.form == "lora")
    return acc, base, build_student(cfg, solo_plan(plan, base.prediction_type), None, base)


def load(args) -> dict:
    cfg = _config(args)
    _, base, student = _base_and_student(cfg)
    return {"frozen_dtype": str(base.precision.frozen), "lora_params": sum(
        p.numel() for p in student.unet.parameters() if p.requires_grad)}


def final(args) -> dict:
    from train.layout import RunLayout
    from train.models import save_student, student_start_weights

    cfg = _config(args, args.run)
    _, base, student = _base_and_student(cfg)
    with torch.no_grad():
        for name, p in student.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1e-3)  # a non-zero adapter, as after training
    path = RunLayout.for_stages(args.run, cfg.stages).stage_final(0)
    save_student(student.unet, student.prediction_type, path, origin="scripts/measure_footprint.py",
                 weights=student_start_weights(None, base))
    (Path(args.run) / "config.yaml").write_text(Path(CONFIG).read_text())
    return {"final": str(path), "bytes": sum(f.stat().st_size for f in path.iterdir())}


def export(args) -> dict:
    from train.export import export_stage

    cfg = _config(args, args.run)
    written = export_stage(Path(args.run), cfg, 0)
    return {"written": {p.name: p.stat().st_size for p in written}}


def step(args) -> dict:
    from accelerate import Accelerator

    from distill.phases import expand_recipe
    from train.bench import solo_plan
    from train.build import build_phase_models
    from train.layout import RunLayout
    from train.models import load_base, torch_dtype
    from train.steps import StepContext, Updater, draw_point, train_step

    cfg = _config(args, Path("/tmp/measure_footprint_step"))
    acc = Accelerator(cpu=True, mixed_precision="no")
    base = load_base(Path(cfg.model.base), cfg.model, acc.device, torch_dtype(cfg.data.vae_dtype))
    plans = expand_recipe(cfg.stages, base.prediction_type)
    plan = solo_plan(next(p for p in plans if p.kind == args.phase and p.form == "lora"), base.prediction_type)
    torch.manual_seed(0)
    models = build_phase_models(cfg, plan, [plan], RunLayout.for_stages(cfg.output_dir, cfg.stages), base, acc)
    built = rss_gib()
    r = cfg.data.resolution
    gen = torch.Generator().manual_seed(0)
    x0 = base.vae.encode(torch.rand(1, 3, r, r, generator=gen) * 2 - 1).latent_dist.mean * base.vae.config.scaling_factor
    cond = base.text.conditioning(["a photo of a cat"], torch.tensor([[r, r, 0, 0, r, r]], dtype=torch.float32))
    start = time.time()
    outcome = train_step(plan, models, draw_point(plan, base.schedule, x0, gen), cond,
                         StepContext(acc, Updater(acc, cfg.optim.max_grad_norm), cfg.discriminator, 0, gen, False))
    return {"phase": plan.name, "step_s": round(time.time() - start, 1), "ok": outcome.ok, "after_build": built}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("load", "final", "export", "step"))
    parser.add_argument("--base", required=True)
    parser.add_argument("--run", type=Path)
    parser.add_argument("--frozen-dtype", default="bf16")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--phase", default="adv_conditional")
    args = parser.parse_args()
    start = time.time()
    result = {"load": load, "final": final, "export": export, "step": step}[args.what](args)
    print(json.dumps({"what": args.what, "seconds": round(time.time() - start, 1), **result, **rss_gib()}))


if __name__ == "__main__":
    main()
