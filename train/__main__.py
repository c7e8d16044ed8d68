"""Command line of a distillation run.

    python -m train CONFIG.yaml [dotted.key=value ...] [--dry-run]
    accelerate launch [accelerate flags] -m train CONFIG.yaml [dotted.key=value ...]

Re-running the same command resumes from the newest complete checkpoint in output_dir.
`--dry-run` prints the resolved config and the expanded recipe, then exits without loading
any model. Problems the user can fix (config, paths, base model, data, damaged files, a full
disk, a second run on one output_dir) end with one line `error: <what> (<where>): <what to do>`
and exit status 2; `--debug` (or LIGHTNING_DEBUG=1) adds the traceback.
"""

from __future__ import annotations

import argparse
import sys

from distill.phases import expand_recipe
from train.config import config_to_yaml, load_config
from train.errors import add_debug_flag, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML config, e.g. configs/digits.yaml")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config, the recipe and its memory plan, then exit")
    parser.add_argument("--device-memory", default=None, metavar="SIZE",
                        help="with --dry-run: say whether each phase fits a device of SIZE "
                             "(e.g. 80GB) and, if not, which options make it fit")
    add_debug_flag(parser)
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(config_to_yaml(cfg))
        print("# recipe")
        for plan in expand_recipe(cfg.stages):
            teacher = "base" if plan.teacher.stage < 0 else f"stage {plan.teacher.stage}"
            print(f"#  {plan.index:2d} stages/{plan.stage_name}/{plan.name:<22s} form={plan.form:<4s} "
                  f"steps={plan.steps:<6d} teacher={teacher} ({plan.teacher.steps}-step grid, "
                  f"cfg {plan.teacher.guidance_scale:g}) prediction={plan.prediction_type}")
        _print_memory_plan(cfg, args.device_memory)
        return 0
    # Optional heavy import (diffusers, transformers, accelerate: seconds): only once the config
    # is known good, so config errors and --dry-run answer at once.
    from train.loop import run

    run(cfg)
    return 0


def _print_memory_plan(cfg, device_memory: str | None) -> None:
    """Per-phase memory from the base's architecture (fake tensors: nothing is allocated)."""
    # Optional heavy import (diffusers and torch's fake-tensor machinery): only for --dry-run.
    from train.memory_plan import base_architecture, config_plan, format_table, parse_bytes

    device_bytes = parse_bytes(device_memory) if device_memory else None
    arch = base_architecture(cfg.model.base)
    if arch is None:
        print(f"# memory plan: no architecture at hand for {cfg.model.base} (build it first)")
        return
    print(f"# memory plan per device: {cfg.data.resolution} px, batch {cfg.data.batch_size}, "
          f"mixed precision {cfg.runtime.mixed_precision}")
    for line in format_table(config_plan(cfg, arch, device_bytes), device_bytes).splitlines():
        print("# " + line)


if __name__ == "__main__":
    sys.exit(run_cli(main))
