"""Everything one phase trains with, built in one place: student, teacher, discriminator,
optimizers, learning rates and EMA (METHOD.md §2, §4, §5).

The student's forms move here from phase to phase: a phase starts from the base (stage 0),
the previous stage's final or the previous phase's final (`RunLayout.student_start`); a LoRA
phase adds an adapter if the start has none, a full phase folds any adapter in, and the
x0-conversion phase reinterprets the epsilon student as an x0 one (`switch_to_x0`). The
frozen teacher is the student's own UNet with its adapter disabled when that is exactly the
teacher's weights (METHOD.md §5: no second copy), else a frozen copy in the compute dtype.
`train/steps.py` takes the returned `PhaseModels`; `train/loop.py` only orders things.
"""

from __future__ import annotations

import ctypes
import gc
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from discriminator.model import Discriminator
from distill.lora import add_lora, has_lora, load_lora_state_dict
from distill.phases import PhasePlan
from distill.precision import remove_frozen_storage
from distill.schedule import NoiseSchedule
from distill.student import Student, switch_to_x0, trainable_parameters
from distill.teacher import Teacher
from train.config import Config, DiscriminatorConfig, OptimConfig
from train.layout import RunLayout
from train.models import (
    BaseModel,
    load_discriminator_state,
    load_student,
    load_student_tensors,
    read_discriminator_state,
    read_student,
    shared_unet,
    unet_copy,
)
from train.text import latent_size


@dataclass(frozen=True)
class LearningRates:
    student: float
    discriminator: float


def learning_rates(optim: OptimConfig, plan: PhasePlan) -> LearningRates:
    """The phase's own LR, else the paper's defaults by kind and form (METHOD.md §4)."""
    if plan.lr is not None:
        lr = plan.lr
    elif plan.adversarial:
        lr = optim.lr_adv_lora if plan.form == "lora" else optim.lr_adv_full
    else:
        lr = optim.lr_mse
    return LearningRates(lr, plan.discriminator_lr or optim.discriminator_lr or lr)


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

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow as named tensors (saved in the checkpoint's extra state)."""
        return {f"ema.shadow.{i}": s for i, s in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if len(state) != len(self.params):
            raise ValueError(f"EMA state holds {len(state)} tensors for {len(self.params)} parameters")
        self.shadow = [state[f"ema.shadow.{i}"].to(p.device) for i, p in enumerate(self.params)]


@dataclass
class PhaseModels:
    """What a phase's steps use. `student.unet`, `discriminator` and the optimizers are the
    accelerate-prepared objects (DDP-wrapped under several processes)."""

    student: Student
    teacher: Teacher
    schedule: NoiseSchedule
    optimizer_g: torch.optim.Optimizer
    params_g: list
    lr: LearningRates
    discriminator: Discriminator | None = None
    optimizer_d: torch.optim.Optimizer | None = None
    params_d: list | None = None
    ema: EMA | None = None
    discriminator_carried: dict = field(default_factory=dict)  # the stage's D state at phase start

    def trainable_parameters(self) -> list:
        """What trains in this phase (and all that its checkpoints hold of the models)."""
        return [*self.params_g, *(self.params_d or [])]

    def set_lr_factor(self, factor: float) -> None:
        for group in self.optimizer_g.param_groups:
            group["lr"] = self.lr.student * factor
        if self.optimizer_d is not None:
            for group in self.optimizer_d.param_groups:
                group["lr"] = self.lr.discriminator * factor


def make_optimizer(params: list, *, lr: float, betas: tuple, weight_decay: float,
                   kind: str, device: torch.device) -> torch.optim.Optimizer:
    """AdamW (torch) or bitsandbytes' 8-bit AdamW (`optim.optimizer=adamw8bit`: 2 bytes of
    state per parameter instead of 8; its kernels run on CUDA only)."""
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if kind != "adamw8bit":
        raise ValueError(f"optimizer {kind!r} is not one of ['adamw', 'adamw8bit']")
    if device.type != "cuda":
        raise RuntimeError(f"optim.optimizer=adamw8bit needs a CUDA device (bitsandbytes' 8-bit AdamW "
                           f"has CUDA kernels only); this run is on {device.type}: use optim.optimizer=adamw")
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise RuntimeError("optim.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes") from err
    return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)


def compile_module(module: torch.nn.Module, backend: str) -> torch.nn.Module:
    """`runtime.compile`: torch.compile in place (`nn.Module.compile`), so state-dict keys,
    checkpoints, exports and accelerate's unwrap see the same module."""
    module.compile(backend=backend)
    return module


# ----------------------------------------------------------------------------- students & teachers


def build_student(cfg: Config, plan: PhasePlan, start: Path | None, base: BaseModel) -> Student:
    """The phase's student in its form, from `start` (None: the base model)."""
    if start is None and plan.form == "lora":
        # The adapter trains, the base stays frozen: share its weights instead of copying them.
        unet, prediction_type = base.precision.hold(shared_unet(base.unet)), base.prediction_type
    elif start is None:
        unet, prediction_type = unet_copy(base.unet, torch.float32), base.prediction_type  # trainable: fp32
    elif plan.form == "full":
        unet, prediction_type = load_student(start, base, fold_lora=True)  # trainable: fp32
    else:
        unet, prediction_type = _frozen_student(start, base)
    if plan.form == "lora" and not has_lora(unet):
        add_lora(unet, cfg.student.lora_rank, cfg.student.lora_alpha)
    if plan.form == "full":
        unet.requires_grad_(True)
    if cfg.student.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    student = Student(unet, prediction_type)
    if plan.prediction_type == "sample" and prediction_type != "sample":
        student = switch_to_x0(student)  # the x0-conversion phase (METHOD.md §3)
    return student


def _frozen_student(start: Path, base: BaseModel):
    """A LoRA student's frozen W from a saved student, stored like every frozen UNet; when W
    is the base's to the storage dtype's last bit (the LoRA track from the base), the base's
    own tensors are shared instead of holding a second copy."""
    saved, weights, lora = load_student_tensors(start)
    if _equals_base(weights, base):
        unet = base.precision.hold(shared_unet(base.unet))
        if saved.lora_rank:
            add_lora(unet, saved.lora_rank, saved.lora_alpha)
            load_lora_state_dict(unet, lora)
        return unet, saved.prediction_type
    unet, prediction_type = load_student(start, base, fold_lora=False, dtype=base.precision.frozen)
    return base.precision.hold(unet), prediction_type


def _equals_base(weights, base: BaseModel) -> bool:
    """Whether W, in the base's storage dtype, is the stored base (read one tensor at a time)."""
    stored = base.unet.state_dict()
    if set(weights) != set(stored):
        return False
    return all(torch.equal(weights[k].to(stored[k].dtype), stored[k].cpu()) for k in weights)


def build_teacher(plan: PhasePlan, layout: RunLayout, base: BaseModel, student_unet) -> Teacher:
    """The frozen teacher. When the student is a fresh LoRA on exactly the teacher's weights,
    the teacher is the student's own UNet with the adapter disabled (METHOD.md §5): no copy.
    The base teacher is the base itself; any other is a copy stored like every frozen UNet
    (`base.precision`)."""
    source = layout.teacher_source(plan)
    stage_start = None if plan.stage == 0 else layout.stage_final(plan.stage - 1)
    plain_source = source is None or read_student(source).lora_rank == 0
    if plan.form == "lora" and source == stage_start and plain_source:
        return Teacher(student_unet, base.schedule, plan.teacher.prediction_type,
                       plan.teacher.guidance_scale, disable_adapter=True)
    if source is None:
        unet = base.unet
    else:
        unet, _ = load_student(source, base, fold_lora=True, dtype=base.precision.frozen)
        base.precision.hold(unet.requires_grad_(False))
    unet.requires_grad_(False).eval()
    return Teacher(unet, base.schedule, plan.teacher.prediction_type, plan.teacher.guidance_scale)


def build_discriminator(d_cfg: DiscriminatorConfig, plan: PhasePlan, base: BaseModel,
                        resolution: int) -> Discriminator:
    """A fresh discriminator on the base UNet's encoder (METHOD.md §4)."""
    disc = Discriminator(base.unet, conditional=plan.conditional, bucket_edges=d_cfg.bucket_edges,
                         multiscale=d_cfg.multiscale, backbone_trainable=d_cfg.backbone_trainable,
                         head_channels=d_cfg.head_channels or None,
                         latent_size=latent_size(base.vae, resolution),
                         share_weights=not d_cfg.backbone_trainable)
    if d_cfg.backbone_trainable:
        remove_frozen_storage(disc.backbone)  # a trainable copy of a half-precision base trains in fp32
        disc.backbone.float()
    if d_cfg.gradient_checkpointing:
        disc.backbone.enable_gradient_checkpointing()
    return disc


# ----------------------------------------------------------------------------- one phase


def build_phase_models(cfg: Config, plan: PhasePlan, plans: list[PhasePlan], layout: RunLayout,
                       base: BaseModel, accelerator: Accelerator) -> PhaseModels:
    """Student, teacher, (adversarial phases) a fresh discriminator, their optimizers and EMA,
    prepared by accelerate."""
    # Fresh LoRA factors and discriminator heads draw from the global RNG: the caller seeds it
    # per phase, and the draws happen in this order (student, then discriminator) on every rank.
    student = build_student(cfg, plan, layout.student_start(plan, plans), base)
    teacher = build_teacher(plan, layout, base, student.unet)
    lr = learning_rates(cfg.optim, plan)
    betas = tuple(cfg.optim.betas_adv if plan.adversarial else cfg.optim.betas_mse)
    params_g = trainable_parameters(student.unet)
    opt_g = make_optimizer(params_g, lr=lr.student, betas=betas, weight_decay=cfg.optim.weight_decay,
                           kind=cfg.optim.optimizer, device=accelerator.device)
    if cfg.runtime.compile:
        compile_module(student.unet, cfg.runtime.compile_backend)
    unet, opt_g = accelerator.prepare(student.unet, opt_g)
    models = PhaseModels(Student(unet, student.prediction_type), teacher, base.schedule, opt_g,
                         params_g, lr)
    if plan.adversarial:
        disc = build_discriminator(cfg.discriminator, plan, base, cfg.data.resolution)
        models.params_d = disc.trainable_parameters()
        opt_d = make_optimizer(models.params_d, lr=lr.discriminator, betas=tuple(cfg.optim.betas_adv),
                               weight_decay=0.0, kind=cfg.optim.optimizer, device=accelerator.device)
        if cfg.runtime.compile:
            compile_module(disc, cfg.runtime.compile_backend)
        if cfg.discriminator.reinit == "stage":
            # METHOD.md §4: one discriminator per stage. What the stage's earlier adversarial
            # phases trained (heads of this form, a trainable backbone) continues here with
            # its Adam moments; only the objective changes (across the merge too).
            models.discriminator_carried = read_discriminator_state(layout.discriminator_source(plan, plans))
            load_discriminator_state(disc, opt_d, models.discriminator_carried)
        models.discriminator, models.optimizer_d = accelerator.prepare(disc, opt_d)
    if cfg.student.ema_decay > 0:
        models.ema = EMA(params_g, cfg.student.ema_decay)
    return models


def return_freed_memory() -> bool:
    """Give the memory a finished phase freed back to the system: collect its reference cycles
    (peft and hooks make some) and, on glibc, `malloc_trim(0)`: freed blocks of the large heap
    stay mapped otherwise (at SDXL size on a CPU: 13.7 GB resident after a phase, 7.0 GB after
    the trim). Returns whether a trim ran (False off glibc)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    libc.malloc_trim(0)
    return True
