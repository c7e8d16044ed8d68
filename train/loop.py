"""The training loop: every stage and phase of the recipe, resumable, on 1..N processes.

    python -m train CONFIG.yaml [k=v ...]          (one process)
    accelerate launch [flags] -m train CONFIG.yaml   (DDP / FSDP / DeepSpeed via accelerate)

Order of things (and the only place that owns it): load the base → for each phase of the
expanded recipe: build its models (train/build.py) → resume → steps (train/steps.py; then
EMA, log, validate, checkpoint) → phase final → at a stage's end: stage final, validation
grid, exports (train/export.py). Finished phases are never redone: a phase whose `final/`
exists is skipped, and a phase with checkpoints resumes from the newest complete one. Every
path comes from `RunLayout` (train/layout.py).

What is on disk is verified before it is trusted (ARCHITECTURE.md pitfall 12): the run
directory is locked for this run (train/lock.py) and cleared of the staging files of
interrupted writes, damaged finals are set aside and rebuilt (train/recovery.py), a damaged
checkpoint is set aside for the previous one (`intact_checkpoint`), damaged exports are
written again, a stage's missing grid is rendered again. Problems the user can fix end the
run with a one-line `UserError` (train/errors.py), before any model loads where they can be
seen then (config, base layout, training shards); a full disk is one (`disk_full_guard`), and
so is a phase that skipped too many steps as non-finite (no final is published).

SIGTERM, SIGINT and SIGUSR1 stop the run after the current step with a complete checkpoint on
every rank (train/stop.py): `Stopped`, one line, exit status 75.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from tqdm.auto import tqdm

from distill.phases import PhasePlan, expand_recipe, phase_start_step
from train.build import PhaseModels, build_phase_models, lr_factor, return_freed_memory
from train.checkpoint import (
    Counters,
    frozen_reference,
    intact_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    read_extra_state,
    remove_checkpoints,
    save_checkpoint,
)
from train.config import Config, config_to_dict, config_to_yaml
from train.data import check_training_data, stream_seed, training_stream
from train.embedded import check_resolution, resolve_base, resolve_train_shards, validation_prompts
from train.errors import Diverged, Stopped
from train.export import export_stage
from train.files import disk_full_guard, remove_orphans, write_text_atomic
from train.layout import RunLayout
from train.lock import claim_run_dir
from train.manifest import file_problem
from train.models import (
    BaseModel,
    discriminator_state,
    is_complete,
    link_or_copy,
    load_base,
    load_student,
    save_student,
    student_start_weights,
    torch_dtype,
)
from train.ranks import any_rank, main_process_check
from train.recovery import set_aside_damaged_finals
from train.steps import StepContext, StepOutcome, Updater, draw_point, train_step
from train.stop import StopRequest, stop_on_signals
from train.text import batch_to_latents
from train.tracking import Tracker
from train.validation import render, save_grid

log = logging.getLogger("train")


@dataclass(frozen=True)
class RunResult:
    output_dir: Path
    stage_finals: list[Path]
    exports: list[Path]


@dataclass(frozen=True)
class _Run:
    """What every phase of one run shares."""

    cfg: Config
    layout: RunLayout
    plans: list[PhasePlan]
    base: BaseModel
    shards: str
    accelerator: Accelerator
    tracker: Tracker
    stop: StopRequest


def run(cfg: Config) -> RunResult:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with stop_on_signals() as stop:
        accelerator = Accelerator(
            mixed_precision=cfg.runtime.mixed_precision,
            gradient_accumulation_steps=cfg.runtime.gradient_accumulation_steps,
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.runtime.nccl_timeout_s))],
        )
        layout = RunLayout.for_stages(cfg.output_dir, cfg.stages)
        lock = claim_run_dir(layout.root, layout.lock_file, accelerator)  # before anything is written
        try:
            if lock is not None and lock.exclusive:  # no other process writes here
                remove_orphans(layout.root)
            with disk_full_guard(layout.root):
                return _run_locked(cfg, layout, accelerator, stop)
        finally:
            if lock is not None:
                lock.release()


def _run_locked(cfg: Config, layout: RunLayout, accelerator: Accelerator, stop: StopRequest) -> RunResult:
    if accelerator.is_main_process:
        write_text_atomic(layout.config_file, config_to_yaml(cfg))
    # What the user can fix is found before any model loads: the base's layout, the training
    # shards, the resolution. Embedded ones are built once while the other ranks wait.
    with accelerator.main_process_first():
        base_path = resolve_base(cfg.model)
        shards = resolve_train_shards(cfg.model, cfg.data)
    main_process_check(accelerator, lambda: check_training_data(cfg.data, shards))
    check_resolution(base_path, cfg.data.resolution)
    base = load_base(base_path, cfg.model, accelerator.device, torch_dtype(cfg.data.vae_dtype))
    plans = expand_recipe(cfg.stages, base.prediction_type)
    if accelerator.is_main_process:
        set_aside_damaged_finals(layout, plans)
    accelerator.wait_for_everyone()
    tracker = Tracker(layout, cfg.logging, config_to_dict(cfg), accelerator.is_main_process)
    ctx = _Run(cfg, layout, plans, base, shards, accelerator, tracker, stop)
    finals, exports = [], []
    try:
        for plan in plans:
            _stop_if_requested(ctx, f"before {plan.stage_name}/{plan.name}")
            done = is_complete(layout.phase_final(plan))
            # Every rank looks before any rank can write (the main process writes finals):
            # otherwise a fast main process finishes a merge and a slower rank skips it.
            accelerator.wait_for_everyone()
            if not done:
                if plan.kind == "merge":
                    _merge_phase(ctx, plan)
                else:
                    _train_phase(ctx, plan)
            if plan.last_in_stage:
                # a stage's grid and exports can take minutes: a stop request comes first
                _stop_if_requested(ctx, f"after {plan.stage_name}/{plan.name}, before the stage's exports")
                final, written = _finish_stage(ctx, plan)
                finals.append(final)
                exports.extend(written)
            return_freed_memory()
    finally:
        tracker.finish()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return RunResult(layout.root, finals, exports)


def _stop_if_requested(ctx: _Run, where: str) -> None:
    """Between phases (no step to finish, nothing unsaved): stop if any rank got a signal."""
    if any_rank(ctx.accelerator, ctx.stop.requested):
        raise Stopped(f"on {ctx.stop.signal_name or 'a signal to another rank'} {where}; every "
                      f"finished phase is kept", ctx.layout.root, "run the same command to resume")


# ----------------------------------------------------------------------------- one phase


def _merge_phase(ctx: _Run, plan: PhasePlan) -> None:
    """METHOD.md §5 "merge": fold the LoRA into the weights; the next phase trains the full UNet."""
    start = ctx.layout.student_start(plan, ctx.plans)
    if ctx.accelerator.is_main_process:
        unet, prediction_type = load_student(start, ctx.base, fold_lora=True)
        save_student(unet, prediction_type, ctx.layout.phase_final(plan),
                     origin=f"merge of {start.parent.name}")
    ctx.accelerator.wait_for_everyone()


def _train_phase(ctx: _Run, plan: PhasePlan) -> None:
    """Build → resume → step loop → final."""
    # Fresh LoRA factors and discriminator heads draw from the global RNG: seed it from the
    # phase index so every rank and every (re)start of this phase initialises identically.
    torch.manual_seed(stream_seed(ctx.cfg.seed, "phase-init", plan.index))
    models = build_phase_models(ctx.cfg, plan, ctx.plans, ctx.layout, ctx.base, ctx.accelerator)
    counters = _resume(ctx, plan, models)
    counters = _step_loop(ctx, plan, models, counters)
    _check_skipped(ctx, plan, counters)
    _publish_phase_final(ctx, plan, models)
    del models
    return_freed_memory()  # before the next phase builds its models


def _resume(ctx: _Run, plan: PhasePlan, models: PhaseModels) -> Counters:
    if ctx.accelerator.is_main_process:
        intact_checkpoint(ctx.layout.phase_dir(plan))  # sets damaged newer ones aside
    ctx.accelerator.wait_for_everyone()
    ckpt = latest_checkpoint(ctx.layout.phase_dir(plan))
    if ckpt is None:
        return Counters(plan.index, 0, 0, 0)
    counters = load_checkpoint(ctx.accelerator, ckpt, trainable=models.trainable_parameters(),
                               frozen=_frozen_reference(ctx, plan))
    if models.ema is not None:
        models.ema.load_state_dict(read_extra_state(ckpt))
    log.info("resumed %s/%s at step %d from %s", plan.stage_name, plan.name, counters.step, ckpt)
    return counters


def _open_stream(ctx: _Run, global_step: int):
    acc = ctx.accelerator
    return training_stream(ctx.cfg.data, ctx.shards, seed=ctx.cfg.seed, rank=acc.process_index,
                           world_size=acc.num_processes, resume_step=global_step)


def _step_loop(ctx: _Run, plan: PhasePlan, models: PhaseModels, counters: Counters) -> Counters:
    """Steps from `counters.step` to the end of the phase: LR from the counter, a generator
    seeded by (seed, rank, global step), accumulation, EMA, the non-finite guard, logging,
    validation grids, checkpoints, and a stop on a signal (a checkpoint of the step just
    done, then `Stopped`). Returns the counters at the phase's end."""
    cfg, acc = ctx.cfg, ctx.accelerator
    phase_begin = phase_start_step(ctx.plans, plan.index)
    update = Updater(acc, cfg.optim.max_grad_norm, ctx.stop)
    stream_start = counters.step if counters.stream_start is None else counters.stream_start
    loader = _open_stream(ctx, phase_begin + stream_start)
    stream = iter(loader)
    for _ in range((counters.step - stream_start) * cfg.runtime.gradient_accumulation_steps):
        next(stream)  # the batches the interrupted run had read since this stream was opened
    bar = tqdm(total=plan.steps, initial=counters.step, desc=f"{plan.stage_name}/{plan.name}",
               disable=not (acc.is_main_process and cfg.logging.progress_bar), dynamic_ncols=True)
    step, in_row, skipped = counters.step, counters.nonfinite_in_row, counters.skipped_total
    tick, samples = time.time(), 0
    while step < plan.steps:
        global_step = phase_begin + step
        factor = lr_factor(step, plan.steps, cfg.optim.warmup_steps, cfg.optim.lr_schedule)
        models.set_lr_factor(factor)
        generator = torch.Generator().manual_seed(stream_seed(cfg.seed, acc.process_index, global_step))
        step_ctx = StepContext(acc, update, cfg.discriminator, step, generator,
                               poison=global_step in cfg.runtime.fault_nonfinite_steps)
        ok = True
        for _ in range(cfg.runtime.gradient_accumulation_steps):
            x0, cond = batch_to_latents(next(stream), ctx.base.vae, ctx.base.text,
                                        vae_dtype=torch_dtype(cfg.data.vae_dtype), device=acc.device)
            point = draw_point(plan, ctx.base.schedule, x0, generator)
            with acc.accumulate(models.student.unet):
                outcome = train_step(plan, models, point, cond, step_ctx)
            ok = ok and outcome.ok
            samples += x0.shape[0] * acc.num_processes
        if ok and models.ema is not None:
            models.ema.update()
        in_row = 0 if ok else in_row + 1
        skipped += 0 if ok else 1
        if not ok:
            _on_nonfinite(ctx, plan, step, in_row)
        step += 1
        bar.update(1)
        if step % cfg.logging.log_every_steps == 0 or step == plan.steps:
            elapsed = max(time.time() - tick, 1e-9)
            _log_step(ctx, plan, phase_begin + step, step, lr=models.lr.student * factor,
                      samples_per_s=samples / elapsed, skipped=skipped, ok=ok, outcome=outcome,
                      data=loader, bar=bar)
            tick, samples = time.time(), 0
        if cfg.validation.every_steps and step % cfg.validation.every_steps == 0 and step < plan.steps:
            if acc.is_main_process:
                _validate(ctx, plan, acc.unwrap_model(models.student.unet), models.student.prediction_type,
                          phase_begin + step, tag=f"step{step:06d}")
            acc.wait_for_everyone()
        scheduled = step % cfg.checkpoint.every_steps == 0
        stopping = update.stop_agreed  # the same on every rank: agreed in the step's reduction
        if step < plan.steps and (scheduled or stopping):
            saved = save_checkpoint(
                acc, ctx.layout.phase_dir(plan),
                Counters(plan.index, step, in_row, skipped, step if scheduled else stream_start),
                cfg.checkpoint.keep_last, extra=models.ema.state_dict() if models.ema is not None else None,
                trainable=models.trainable_parameters(), frozen=_frozen_reference(ctx, plan))
            if stopping:
                raise Stopped(f"on {ctx.stop.signal_name or 'a signal to another rank'} at "
                              f"{plan.stage_name}/{plan.name} step {step} of {plan.steps}, after a "
                              f"complete checkpoint", saved, "run the same command to resume")
            loader = _open_stream(ctx, phase_begin + step)  # see training_stream
            stream, stream_start = iter(loader), step
    bar.close()
    return Counters(plan.index, step, in_row, skipped, stream_start)


def _check_skipped(ctx: _Run, plan: PhasePlan, counters: Counters) -> None:
    """A phase whose steps were mostly skipped as non-finite has not trained: publishing its
    final would hand the next phase (and the exports) an untrained student. Its checkpoints
    stay."""
    limit = ctx.cfg.runtime.max_skipped_fraction
    if counters.skipped_total > limit * plan.steps:
        raise Diverged(
            f"{counters.skipped_total} of {plan.steps} steps of {plan.stage_name}/{plan.name} were "
            f"skipped as non-finite (runtime.max_skipped_fraction={limit:g}); no final was published",
            ctx.layout.phase_dir(plan),
            "lower the learning rate (or check the data) and re-run: the phase resumes from its "
            "last checkpoint (delete that folder to start the phase over)")


def _frozen_reference(ctx: _Run, plan: PhasePlan) -> dict:
    return frozen_reference(ctx.base.path, ctx.layout.student_start(plan, ctx.plans))


def _on_nonfinite(ctx: _Run, plan: PhasePlan, step: int, in_row: int) -> None:
    """A skipped step (pitfall 10): warn, and stop the run after too many in a row."""
    limit = ctx.cfg.runtime.max_nonfinite_steps
    log.warning("non-finite loss or gradient at %s/%s step %d: step skipped (%d in a row)",
                plan.stage_name, plan.name, step, in_row)
    if in_row >= limit:
        raise Diverged(
            f"{in_row} non-finite steps in a row at {plan.stage_name}/{plan.name} step {step} "
            f"(runtime.max_nonfinite_steps={limit})", ctx.layout.phase_dir(plan),
            "the last complete checkpoint there is intact: lower the learning rate and re-run to resume")


def _log_step(ctx: _Run, plan: PhasePlan, global_step: int, step: int, *, lr: float,
              samples_per_s: float, skipped: int, ok: bool, outcome: StepOutcome, data, bar) -> None:
    metrics = outcome.metrics  # the host synchronisation, paid on logged steps only
    ctx.tracker.log({"global_step": global_step, "stage": plan.stage_name, "phase": plan.name,
                     "step": step, "lr": lr, "samples_per_s": samples_per_s, "skipped_steps": skipped,
                     "step_ok": ok, **metrics, "data_skips": dict(data.skip_counts),
                     "data_converted": dict(data.converted_counts)})
    bar.set_postfix({k: f"{v:.3g}" for k, v in metrics.items() if k.startswith("loss")})


def _publish_phase_final(ctx: _Run, plan: PhasePlan, models: PhaseModels) -> None:
    """EMA weights in, ranks checked to agree, the final written, the checkpoints dropped."""
    acc = ctx.accelerator
    final_unet = acc.unwrap_model(models.student.unet)
    if models.ema is not None:
        models.ema.copy_to_params()
    _check_ranks_agree(ctx, final_unet, plan, phase_start_step(ctx.plans, plan.index) + plan.steps)
    if acc.is_main_process:
        disc_state = None
        if models.discriminator is not None and ctx.cfg.discriminator.reinit == "stage":
            disc_state = discriminator_state(acc.unwrap_model(models.discriminator), models.optimizer_d,
                                             models.discriminator_carried)
        # A LoRA phase's W is frozen (maybe stored in half precision): its exact fp32 values
        # are the start's.
        weights = student_start_weights(ctx.layout.student_start(plan, ctx.plans), ctx.base) \
            if plan.form == "lora" else None
        save_student(final_unet, models.student.prediction_type, ctx.layout.phase_final(plan),
                     origin=f"{plan.stage_name}/{plan.name} after {plan.steps} steps",
                     discriminator=disc_state, weights=weights)
    acc.wait_for_everyone()
    if acc.is_main_process:
        remove_checkpoints(ctx.layout.phase_dir(plan))
    acc.free_memory()


def _check_ranks_agree(ctx: _Run, unet, plan: PhasePlan, global_step: int) -> None:
    """Every rank must end a phase with the same student; a silent DDP divergence would
    otherwise only show up as a bad export. Compares a float64 checksum of the weights."""
    checksum = torch.stack([p.detach().double().sum() for p in unet.parameters()]).sum()
    sums = ctx.accelerator.gather(checksum.reshape(1).to(ctx.accelerator.device)).tolist()
    ctx.tracker.log({"global_step": global_step, "event": "phase_end", "stage": plan.stage_name,
                     "phase": plan.name, "rank_weight_checksums": sums})
    if max(sums) - min(sums) > 1e-9 * max(1.0, abs(sums[0])):
        raise RuntimeError(f"ranks disagree on the student after {plan.stage_name}/{plan.name}: {sums}")


# ----------------------------------------------------------------------------- stage ends


def _validate(ctx: _Run, plan: PhasePlan, unet, prediction_type: str, global_step: int, tag: str) -> Path:
    """A grid of the fixed prompts × seeds at the student's step count, and its metrics row.
    Main process only; the caller holds the other ranks at a barrier (NCCL timeout raised for
    this, pitfall 9)."""
    v, base = ctx.cfg.validation, ctx.base
    prompts = validation_prompts(ctx.cfg.model, v)
    with ctx.accelerator.autocast():  # a LoRA student's frozen base may be bf16 (model.frozen_dtype)
        images = render(unet, prediction_type, plan.student_steps, schedule=base.schedule, vae=base.vae,
                        text=base.text, prompts=prompts, images_per_prompt=v.images_per_prompt,
                        seed=v.seed, resolution=ctx.cfg.data.resolution)
    path = save_grid(images, ctx.layout.sample_grid(plan, tag), v.images_per_prompt, scale=2)
    _log_grid(ctx, plan, path, global_step, tag)
    return path


def _log_grid(ctx: _Run, plan: PhasePlan, path: Path, global_step: int, tag: str) -> None:
    ctx.tracker.log_image(f"samples/{plan.stage_name}", path, global_step,
                          caption=f"{plan.student_steps}-step student, {plan.stage_name}/{plan.name} {tag}")


def _finish_stage(ctx: _Run, plan: PhasePlan) -> tuple[Path, list[Path]]:
    """Stage final (a complete copy of its last phase's final), a grid, and the exports. A
    rerun makes what an interrupted one left undone: the grid (and its metrics row) when
    missing, the exports when missing or damaged."""
    layout, acc = ctx.layout, ctx.accelerator
    stage_final = layout.stage_final(plan.stage)
    fresh = not is_complete(stage_final)
    acc.wait_for_everyone()  # every rank has looked before the main one writes
    written: list[Path] = []
    if acc.is_main_process:
        if fresh:
            link_or_copy(layout.phase_final(plan), stage_final)
        grid, global_step = layout.sample_grid(plan, "final"), phase_start_step(ctx.plans, plan.index) + plan.steps
        if fresh or not grid.is_file():
            unet, prediction_type = load_student(stage_final, ctx.base, fold_lora=True,
                                                 dtype=ctx.base.precision.frozen)
            ctx.base.precision.hold(unet)
            _validate(ctx, plan, unet, prediction_type, global_step, tag="final")
        else:
            _log_grid(ctx, plan, grid, global_step, "final")  # no-op unless its row is missing
        record = layout.stage_record(plan.stage)
        listed = _recorded_exports(layout.root, record)
        damaged = [problem for p in listed or [] if (problem := file_problem(p))]
        if not fresh and listed is not None and not damaged:
            written = listed  # finished earlier: exports are already there and intact
        elif ctx.cfg.export.enabled:
            if damaged:
                log.warning("exports of stage %s damaged or missing (%s): writing them again",
                            plan.stage_name, "; ".join(damaged))
            written = export_stage(layout.root, ctx.cfg, plan.stage)
        write_text_atomic(record, json.dumps(
            {"stage": plan.stage, "student_steps": plan.student_steps, "prediction_type": plan.prediction_type,
             "exports": [str(Path(p).relative_to(layout.root)) for p in written]}, indent=2))
    acc.wait_for_everyone()
    return stage_final, written


def _recorded_exports(root: Path, record: Path) -> list[Path] | None:
    """The exports stage.json lists, None when it is missing or unreadable (then re-exported)."""
    try:
        return [root / p for p in json.loads(record.read_text())["exports"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
