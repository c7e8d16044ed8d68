"""Per phase kind: samples/s, where a step's time goes, FLOPs, MFU and peak memory.

    python scripts/bench_throughput.py CONFIG [dotted.key=value ...] [--steps 3] [--warmup 1]
        [--peak-tflops 989] [--phases mse adv_conditional ...] [--json out.json]

Builds each distinct (phase kind, form) of the config's recipe as the training loop does and
times real `train_step`s on the config's data (or synthetic images when the base brings no
shards), then each model pass alone: `overhead` = step time without data / sum of the passes
alone. Runs on CPU at small sizes (configs/tiny.yaml, configs/digits.yaml) and unchanged on a
GPU at 1024 px (configs/sdxl_lightning.yaml model.base=DIR). See train/bench.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    p.add_argument("--steps", type=int, default=3, help="timed steps per phase")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (e.g. 989 for H100 bf16 dense)")
    p.add_argument("--phases", nargs="*", default=None, help="phase kinds to run, KIND or KIND:FORM (default: all in the recipe)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_intermixed_args(argv)

    from accelerate import Accelerator

    from distill.lora import add_lora, merge_lora
    from distill.phases import expand_recipe
    from train.bench import bench_phase, format_table, machine_name, representatives, solo_plan
    from train.build import build_phase_models
    from train.config import load_config
    from train.embedded import resolve_base
    from train.layout import RunLayout
    from train.models import load_base, torch_dtype

    cfg = load_config(args.config, args.overrides)
    acc = Accelerator(mixed_precision=cfg.runtime.mixed_precision)
    base = load_base(resolve_base(cfg.model), cfg.model, acc.device, torch_dtype(cfg.data.vae_dtype))
    next_batch = _batches(cfg, base, acc.device)
    plans = [solo_plan(pl, base.prediction_type) for pl in representatives(expand_recipe(cfg.stages, base.prediction_type))]
    rows, merge_s = [], None
    order = {k: i for i, k in enumerate(args.phases or [])}
    plans.sort(key=lambda pl: min(order.get(pl.kind, 99), order.get(f"{pl.kind}:{pl.form}", 99)))
    with tempfile.TemporaryDirectory() as tmp:
        layout = RunLayout.for_stages(tmp, cfg.stages)
        for plan in plans:
            if args.phases and not {plan.kind, f"{plan.kind}:{plan.form}"} & set(args.phases):
                continue
            torch.manual_seed(cfg.seed)
            if plan.kind == "merge":
                unet = _copy_unet(base)
                add_lora(unet, cfg.student.lora_rank, cfg.student.lora_alpha)
                start = time.perf_counter()
                merge_lora(unet)
                merge_s = time.perf_counter() - start
                del unet
                continue
            models = build_phase_models(cfg, plan, [plan], layout, base, acc)
            row = bench_phase(plan, models, next_batch, acc, cfg.discriminator, steps=args.steps,
                              warmup=args.warmup, max_grad_norm=cfg.optim.max_grad_norm, seed=cfg.seed)
            rows.append(row)
            print(f"{row.phase}: {row.step_s:.3f} s/step, overhead {row.overhead:.2f}, "
                  f"peak {row.peak_bytes / 2**30:.2f} GiB, {row.flops / 1e9:.0f} GFLOP/step", flush=True)
            if args.json:  # after every phase, so a long run that is stopped keeps what it measured
                _write_json(args, rows, None, machine_name(acc.device))
            del models
            gc.collect()
            acc.free_memory()
    device = machine_name(acc.device)
    print()
    print(f"config: {args.config} {' '.join(args.overrides)}; {cfg.data.resolution} px, batch "
          f"{cfg.data.batch_size}, mixed precision {cfg.runtime.mixed_precision}, {args.steps} timed steps")
    print(format_table(rows, args.peak_tflops * 1e12, device))
    if merge_s is not None:
        print(f"\nmerge (fold the LoRA into the weights): {merge_s:.3f} s")
    if args.json:
        _write_json(args, rows, merge_s, device)
    return 0


def _write_json(args, rows, merge_s, device) -> None:
    Path(args.json).write_text(json.dumps(
        {"device": device, "config": args.config, "overrides": args.overrides, "merge_s": merge_s,
         "rows": [asdict(r) | {"step_s": r.step_s, "overhead": r.overhead} for r in rows]}, indent=2))


def _copy_unet(base):
    import copy

    return copy.deepcopy(base.unet)


def _batches(cfg, base, device):
    """next_batch() → (x0, cond): the config's stream, or synthetic images for a base without shards."""
    from train.data import ImageBatch, training_stream
    from train.embedded import resolve_train_shards
    from train.models import torch_dtype
    from train.text import batch_to_latents

    vae_dtype = torch_dtype(cfg.data.vae_dtype)
    try:
        shards = resolve_train_shards(cfg.model, cfg.data)
    except Exception:  # a folder base with no shards configured: synthetic images
        shards = None
    if shards or cfg.data.latent_shards:
        stream = iter(training_stream(cfg.data, shards or "", seed=cfg.seed, rank=0, world_size=1, resume_step=0))
        return lambda: batch_to_latents(next(stream), base.vae, base.text, vae_dtype=vae_dtype, device=device)
    b, r = cfg.data.batch_size, cfg.data.resolution
    gen = torch.Generator().manual_seed(cfg.seed)

    def synthetic():
        batch = ImageBatch(torch.rand(b, 3, r, r, generator=gen) * 2 - 1, ["a photo of a cat"] * b,
                           torch.tensor([[r, r, 0, 0, r, r]] * b, dtype=torch.float32),
                           [str(i) for i in range(b)], 0, {})
        return batch_to_latents(batch, base.vae, base.text, vae_dtype=vae_dtype, device=device)

    return synthetic


if __name__ == "__main__":
    sys.exit(main())
