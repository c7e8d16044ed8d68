"""The training loop: every stage and phase of the recipe, resumable, on 1..N processes.

    python -m train CONFIG.yaml [k=v ...]          (one process)
    accelerate launch [flags] -m train CONFIG.yaml   (DDP / FSDP / DeepSpeed via accelerate)

Order of things (and the only place that owns it): build → resume → for each phase of the
expanded recipe: build student, teacher and (adversarial) a fresh discriminator → steps
(D step, G step, EMA, log, validate, checkpoint) → phase final → at a stage's end: stage
final, validation grid, exports. Finished phases are never redone: a phase whose
`final/` exists is skipped, and a phase with checkpoints resumes from the newest complete one.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from tqdm.auto import tqdm

from discriminator.model import Discriminator
from distill.lora import add_lora, has_lora
from distill.phases import BASE, PhasePlan, expand_recipe, phase_start_step
from distill.student import Student, trainable_parameters
from distill.teacher import Teacher
from train import steps as step_fns
from train.checkpoint import (
    Counters,
    latest_checkpoint,
    load_checkpoint,
    remove_checkpoints,
    save_checkpoint,
)
from train.config import Config, config_to_dict, config_to_yaml
from train.data import image_loader, latent_loader, stream_seed
from train.embedded import resolve_base, resolve_train_shards, validation_prompts
from train.models import (
    BaseModel,
    is_complete,
    link_or_copy,
    load_base,
    load_student,
    read_student,
    save_student,
)
from train.text import encode_images, latent_size
from train.tracking import Tracker
from train.validation import render, save_grid

log = logging.getLogger("train")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


@dataclass(frozen=True)
class RunResult:
    output_dir: Path
    stage_finals: list[Path]
    exports: list[Path]


def run(cfg: Config) -> RunResult:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    accelerator = Accelerator(
        mixed_precision=cfg.runtime.mixed_precision,
        gradient_accumulation_steps=cfg.runtime.gradient_accumulation_steps,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.runtime.nccl_timeout_s))],
    )
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_to_yaml(cfg))
    with accelerator.main_process_first():  # build embedded model/shards once, others then load
        base_path = resolve_base(cfg.model)
        shards = resolve_train_shards(cfg.model, cfg.data)
    base = load_base(base_path, cfg.model, accelerator.device, DTYPES[cfg.data.vae_dtype])
    plans = expand_recipe(cfg.stages, base.prediction_type)
    tracker = Tracker(out, cfg.logging, config_to_dict(cfg), accelerator.is_main_process)
    finals, exports = [], []
    try:
        for plan in plans:
            phase_dir = out / "stages" / plan.stage_name / plan.name
            done = is_complete(phase_dir / "final")
            # Every rank looks before any rank can write (the main process writes finals):
            # otherwise a fast main process finishes a merge and a slower rank skips it.
            accelerator.wait_for_everyone()
            if not done:
                if plan.kind == "merge":
                    _merge_phase(plan, plans, out, base, accelerator)
                else:
                    _train_phase(cfg, plan, plans, out, base, shards, accelerator, tracker)
            if plan.last_in_stage:
                final, written = _finish_stage(cfg, plan, plans, out, base, accelerator, tracker)
                finals.append(final)
                exports.extend(written)
    finally:
        tracker.finish()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return RunResult(out, finals, exports)


# ----------------------------------------------------------------------------- students & teachers

def _stage_final(out: Path, plans: list[PhasePlan], stage: int) -> Path:
    return out / "stages" / next(p.stage_name for p in plans if p.stage == stage) / "final"


def _start_dir(plan: PhasePlan, plans: list[PhasePlan], out: Path) -> Path | None:
    """Where this phase's student starts: the previous phase's final, the previous stage's
    final (its student becomes this stage's starting point), or None for the base model."""
    if not plan.first_in_stage:
        prev = plans[plan.index - 1]
        return out / "stages" / prev.stage_name / prev.name / "final"
    return None if plan.stage == 0 else _stage_final(out, plans, plan.stage - 1)


def _build_student(cfg: Config, plan: PhasePlan, start: Path | None, base: BaseModel) -> Student:
    if start is None:
        unet = copy.deepcopy(base.unet)
    else:
        unet, _ = load_student(start, base, fold_lora=plan.form == "full")
    if plan.form == "lora" and not has_lora(unet):
        add_lora(unet, cfg.student.lora_rank, cfg.student.lora_alpha)
    if plan.form == "full":
        unet.requires_grad_(True)
    if cfg.student.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return Student(unet, plan.prediction_type)


def _build_teacher(plan: PhasePlan, plans: list[PhasePlan], out: Path, base: BaseModel,
                   student_unet, dtype: torch.dtype) -> Teacher:
    """The frozen teacher. When the student is a fresh LoRA on exactly the teacher's weights,
    the teacher is the student's own UNet with the adapter disabled (METHOD.md §5): no copy."""
    source = None if plan.teacher.stage == BASE else _stage_final(out, plans, plan.teacher.stage)
    stage_start = None if plan.stage == 0 else _stage_final(out, plans, plan.stage - 1)
    plain_source = source is None or read_student(source).lora_rank == 0
    if plan.form == "lora" and source == stage_start and plain_source:
        return Teacher(student_unet, base.schedule, plan.teacher.prediction_type,
                       plan.teacher.guidance_scale, disable_adapter=True)
    if source is None:
        unet = base.unet if dtype == torch.float32 else copy.deepcopy(base.unet).to(dtype)
    else:
        unet, _ = load_student(source, base, fold_lora=True)
        unet = unet.to(dtype)
    unet.requires_grad_(False).eval()
    return Teacher(unet, base.schedule, plan.teacher.prediction_type, plan.teacher.guidance_scale)


def _merge_phase(plan: PhasePlan, plans: list[PhasePlan], out: Path, base: BaseModel,
                 accelerator: Accelerator) -> None:
    """METHOD.md §5 "merge": fold the LoRA into the weights; the next phase trains the full UNet."""
    start = _start_dir(plan, plans, out)
    if accelerator.is_main_process:
        unet, prediction_type = load_student(start, base, fold_lora=True)
        save_student(unet, prediction_type, out / "stages" / plan.stage_name / plan.name / "final",
                     origin=f"merge of {start.parent.name}")
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------- one phase

def _learning_rates(cfg: Config, plan: PhasePlan) -> tuple[float, float]:
    o = cfg.optim
    if plan.lr is not None:
        lr = plan.lr
    elif plan.adversarial:
        lr = o.lr_adv_lora if plan.form == "lora" else o.lr_adv_full
    else:
        lr = o.lr_mse
    lr_d = plan.discriminator_lr or o.discriminator_lr or lr
    return lr, lr_d


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """LR multiplier derived from the step counter alone (no scheduler state to resume)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "cosine" and total > warmup:
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    return 1.0


class EMA:
    """Exponential moving average of the trainable student parameters (checkpointed)."""

    def __init__(self, params, decay: float):
        self.decay = decay
        self.params = list(params)
        self.shadow = [p.detach().clone().float() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for s, p in zip(self.shadow, self.params):
            p.copy_(s.to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        self.shadow = [s.to(p.device) for s, p in zip(state["shadow"], self.params)]


def _batches(cfg: Config, shards: str, accelerator: Accelerator, global_step: int):
    """A data stream seeded by (seed, rank, global_step) (pitfall 7). The loop opens a new one
    at every phase start and after every checkpoint, so an interrupted and resumed run reads
    exactly the batches an uninterrupted one reads."""
    common = dict(batch_size=cfg.data.batch_size, seed=cfg.seed, rank=accelerator.process_index,
                  world_size=accelerator.num_processes, resume_step=global_step,
                  shuffle_buffer=cfg.data.shuffle_buffer, num_workers=cfg.data.num_workers)
    if cfg.data.latent_shards:
        return latent_loader(cfg.data.latent_shards, **common)
    urls = shards.split(" ") if " " in shards else shards
    return image_loader(urls, resolution=cfg.data.resolution, center_crop=cfg.data.center_crop, **common)


def _to_latents(batch, base: BaseModel, cfg: Config, device):
    """(x0 latents, conditioning) from an image or a precomputed latent batch."""
    if hasattr(batch, "latents"):
        return batch.latents.to(device), batch.cond.to(device)
    latents = encode_images(base.vae, batch.pixels, dtype=DTYPES[cfg.data.vae_dtype])
    cond = base.text.conditioning(batch.captions, batch.time_ids).to(device)
    return latents.to(device), cond


def _train_phase(cfg: Config, plan: PhasePlan, plans: list[PhasePlan], out: Path, base: BaseModel,
                 shards: str, accelerator: Accelerator, tracker: Tracker) -> None:
    phase_dir = out / "stages" / plan.stage_name / plan.name
    start = _start_dir(plan, plans, out)
    # Fresh LoRA factors and discriminator heads draw from the global RNG: seed it from the
    # phase index so every rank and every (re)start of this phase initialises identically.
    torch.manual_seed(stream_seed(cfg.seed, "phase-init", plan.index))
    student = _build_student(cfg, plan, start, base)
    teacher_dtype = DTYPES[cfg.runtime.mixed_precision]
    teacher = _build_teacher(plan, plans, out, base, student.unet, teacher_dtype)
    lr, lr_d = _learning_rates(cfg, plan)
    betas = tuple(cfg.optim.betas_adv if plan.adversarial else cfg.optim.betas_mse)
    params_g = trainable_parameters(student.unet)
    opt_g = torch.optim.AdamW(params_g, lr=lr, betas=betas, weight_decay=cfg.optim.weight_decay)
    unet, opt_g = accelerator.prepare(student.unet, opt_g)
    student = Student(unet, student.prediction_type)
    disc = opt_d = None
    params_d: list = []
    if plan.adversarial:
        d_cfg = cfg.discriminator
        disc = Discriminator(base.unet, conditional=plan.conditional, bucket_edges=d_cfg.bucket_edges,
                             multiscale=d_cfg.multiscale, backbone_trainable=d_cfg.backbone_trainable,
                             head_channels=d_cfg.head_channels or None, latent_size=latent_size(base.vae, cfg.data.resolution),
                             share_weights=not d_cfg.backbone_trainable)
        params_d = disc.trainable_parameters()
        opt_d = torch.optim.AdamW(params_d, lr=lr_d, betas=tuple(cfg.optim.betas_adv), weight_decay=0.0)
        disc, opt_d = accelerator.prepare(disc, opt_d)
    ema = EMA(params_g, cfg.student.ema_decay) if cfg.student.ema_decay > 0 else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    counters = Counters(plan.index, 0, 0, 0)
    ckpt = latest_checkpoint(phase_dir)
    if ckpt is not None:
        counters = load_checkpoint(accelerator, ckpt)
        log.info("resumed %s/%s at step %d from %s", plan.stage_name, plan.name, counters.step, ckpt)
    phase_begin = phase_start_step(plans, plan.index)
    update = step_fns.Updater(accelerator, cfg.optim.max_grad_norm)
    loader = _batches(cfg, shards, accelerator, phase_begin + counters.step)
    stream = iter(loader)
    bar = tqdm(total=plan.steps, initial=counters.step, desc=f"{plan.stage_name}/{plan.name}",
               disable=not (accelerator.is_main_process and cfg.logging.progress_bar), dynamic_ncols=True)
    step, in_row, skipped = counters.step, counters.nonfinite_in_row, counters.skipped_total
    tick, samples = time.time(), 0
    while step < plan.steps:
        global_step = phase_begin + step
        factor = lr_factor(step, plan.steps, cfg.optim.warmup_steps, cfg.optim.lr_schedule)
        for group in opt_g.param_groups:
            group["lr"] = lr * factor
        if opt_d is not None:
            for group in opt_d.param_groups:
                group["lr"] = lr_d * factor
        generator = torch.Generator().manual_seed(stream_seed(cfg.seed, accelerator.process_index, global_step))
        poison = global_step in cfg.runtime.fault_nonfinite_steps
        ok = True
        for _ in range(cfg.runtime.gradient_accumulation_steps):
            batch = next(stream)
            x0, cond = _to_latents(batch, base, cfg, accelerator.device)
            point = step_fns.draw_point(plan, base.schedule, x0, generator)
            with accelerator.accumulate(unet):
                outcome = _one_step(cfg, plan, point, cond, student, teacher, disc, base, accelerator,
                                    update, opt_g, params_g, opt_d, params_d, step, generator, poison)
            ok = ok and outcome.ok
            samples += x0.shape[0] * accelerator.num_processes
        if ok and ema is not None:
            ema.update()
        in_row = 0 if ok else in_row + 1
        skipped += 0 if ok else 1
        if not ok:
            log.warning("non-finite loss or gradient at %s/%s step %d: step skipped (%d in a row)",
                        plan.stage_name, plan.name, step, in_row)
            if in_row >= cfg.runtime.max_nonfinite_steps:
                raise RuntimeError(
                    f"{in_row} non-finite steps in a row at {plan.stage_name}/{plan.name} step {step} "
                    f"(runtime.max_nonfinite_steps={cfg.runtime.max_nonfinite_steps}); the last complete "
                    f"checkpoint in {phase_dir} is intact: lower the learning rate and re-run to resume")
        step += 1
        bar.update(1)
        if step % cfg.logging.log_every_steps == 0 or step == plan.steps:
            elapsed = max(time.time() - tick, 1e-9)
            row = {"global_step": phase_begin + step, "stage": plan.stage_name, "phase": plan.name,
                   "step": step, "lr": lr * factor, "samples_per_s": samples / elapsed,
                   "skipped_steps": skipped, "step_ok": ok, **outcome.metrics,
                   "data_skips": dict(loader.skip_counts)}
            tracker.log(row)
            bar.set_postfix({k: f"{v:.3g}" for k, v in outcome.metrics.items() if k.startswith("loss")})
            tick, samples = time.time(), 0
        if cfg.validation.every_steps and step % cfg.validation.every_steps == 0 and step < plan.steps:
            if accelerator.is_main_process:
                _validate(cfg, plan, accelerator.unwrap_model(unet), student.prediction_type, base, out,
                          tracker, phase_begin + step, tag=f"step{step:06d}")
            accelerator.wait_for_everyone()
        if step % cfg.checkpoint.every_steps == 0 and step < plan.steps:
            save_checkpoint(accelerator, phase_dir, Counters(plan.index, step, in_row, skipped),
                            cfg.checkpoint.keep_last)
            loader = _batches(cfg, shards, accelerator, phase_begin + step)  # see _batches
            stream = iter(loader)
    bar.close()
    final_unet = accelerator.unwrap_model(unet)
    if ema is not None:
        ema.copy_to_params()
    _check_ranks_agree(accelerator, final_unet, plan, tracker, phase_begin + plan.steps)
    if accelerator.is_main_process:
        save_student(final_unet, student.prediction_type, phase_dir / "final",
                     origin=f"{plan.stage_name}/{plan.name} after {plan.steps} steps")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        remove_checkpoints(phase_dir)
    accelerator.free_memory()
    del unet, disc, opt_g, opt_d, teacher, student


def _check_ranks_agree(accelerator: Accelerator, unet, plan: PhasePlan, tracker: Tracker,
                       global_step: int) -> None:
    """Every rank must end a phase with the same student; a silent DDP divergence would
    otherwise only show up as a bad export. Compares a float64 checksum of the weights."""
    checksum = torch.stack([p.detach().double().sum() for p in unet.parameters()]).sum()
    sums = accelerator.gather(checksum.reshape(1).to(accelerator.device)).tolist()
    tracker.log({"global_step": global_step, "event": "phase_end", "stage": plan.stage_name,
                 "phase": plan.name, "rank_weight_checksums": sums})
    if max(sums) - min(sums) > 1e-9 * max(1.0, abs(sums[0])):
        raise RuntimeError(f"ranks disagree on the student after {plan.stage_name}/{plan.name}: {sums}")


def _one_step(cfg, plan, point, cond, student, teacher, disc, base, accelerator, update, opt_g, params_g,
              opt_d, params_d, step, generator, poison) -> step_fns.StepOutcome:
    common = dict(student=student, teacher=teacher, schedule=base.schedule, accelerator=accelerator,
                  update=update, poison=poison)
    if plan.kind == "mse":
        return step_fns.mse_step(plan, point, cond, optimizer=opt_g, params=params_g, **common)
    if plan.kind == "x0_convert":
        return step_fns.x0_convert_step(plan, point, cond, optimizer=opt_g, params=params_g, **common)
    return step_fns.adversarial_step(plan, point, cond, discriminator=disc, d_cfg=cfg.discriminator,
                                     optimizer_g=opt_g, params_g=params_g, optimizer_d=opt_d,
                                     params_d=params_d, step=step, generator=generator, **common)


# ----------------------------------------------------------------------------- stage ends

def _validate(cfg: Config, plan: PhasePlan, unet, prediction_type: str, base: BaseModel, out: Path,
              tracker: Tracker, global_step: int, tag: str) -> Path:
    """A grid of the fixed prompts × seeds at the student's step count. Main process only;
    the caller holds the other ranks at a barrier (NCCL timeout raised for this, pitfall 9)."""
    prompts = validation_prompts(cfg.model, cfg.validation)
    images = render(unet, prediction_type, plan.student_steps, schedule=base.schedule, vae=base.vae,
                    text=base.text, prompts=prompts, images_per_prompt=cfg.validation.images_per_prompt,
                    seed=cfg.validation.seed, resolution=cfg.data.resolution)
    path = save_grid(images, out / "samples" / f"{plan.stage_name}_{plan.name}_{tag}.png",
                     cfg.validation.images_per_prompt, scale=2)
    tracker.log_image(f"samples/{plan.stage_name}", path, global_step,
                      caption=f"{plan.student_steps}-step student, {plan.stage_name}/{plan.name} {tag}")
    return path


def _finish_stage(cfg: Config, plan: PhasePlan, plans: list[PhasePlan], out: Path, base: BaseModel,
                  accelerator: Accelerator, tracker: Tracker) -> tuple[Path, list[Path]]:
    """Stage final (a complete copy of its last phase's final), a grid, and the exports."""
    stage_final = out / "stages" / plan.stage_name / "final"
    fresh = not is_complete(stage_final)
    accelerator.wait_for_everyone()  # every rank has looked before the main one writes
    written: list[Path] = []
    if accelerator.is_main_process:
        if fresh:
            link_or_copy(out / "stages" / plan.stage_name / plan.name / "final", stage_final)
            unet, prediction_type = load_student(stage_final, base, fold_lora=True)
            _validate(cfg, plan, unet, prediction_type, base, out, tracker,
                      phase_start_step(plans, plan.index) + plan.steps, tag="final")
        stage_json = out / "stages" / plan.stage_name / "stage.json"
        listed = [out / p for p in json.loads(stage_json.read_text())["exports"]] if stage_json.is_file() else []
        if not fresh and stage_json.is_file() and all(p.is_file() for p in listed):
            written = listed  # finished earlier: exports are already there
        elif cfg.export.enabled:
            written = _export_stage(cfg, out, plan.stage)
        stage_json.write_text(json.dumps(
            {"stage": plan.stage, "student_steps": plan.student_steps, "prediction_type": plan.prediction_type,
             "exports": [str(Path(p).relative_to(out)) for p in written]}, indent=2))
    accelerator.wait_for_everyone()
    return stage_final, written


def _export_stage(cfg: Config, out: Path, stage: int) -> list[Path]:
    """Exports of one stage (train/export.py); absent until that module exists."""
    try:
        from train.export import export_stage
    except ImportError:
        log.warning("train.export is not available: no exports written for stage %d", stage)
        return []
    return export_stage(out, cfg, stage)
