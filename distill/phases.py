"""The recipe: stages and phases of progressive adversarial distillation (METHOD.md §2, §3).

`StageConfig`/`PhaseConfig` are the recipe's part of the typed config (train/config.py nests
them). `expand_recipe` turns them into the flat, ordered list of `PhasePlan`s the training
loop walks, each knowing its teacher (previous stage, base, or skip-level), student form,
loss and discriminator form. `locate` maps a global optimizer step to (phase, step in phase),
so the schedule derives from one counter and resuming needs nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from distill.schedule import student_timesteps

PHASE_KINDS = ("mse", "x0_convert", "adv_conditional", "adv_unconditional", "merge")
ADVERSARIAL_KINDS = ("adv_conditional", "adv_unconditional")
STUDENT_FORMS = ("full", "lora")
TEACHER_SOURCES = ("previous", "skip_level")
RENOISE_MODES = ("auto", "on", "off")
BASE = -1  # teacher_stage value meaning "the original base model"


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the stage/phase and what is allowed."""


@dataclass
class PhaseConfig:
    kind: str = "mse"  # one of PHASE_KINDS
    steps: int = 100  # optimizer steps of the student in this phase (0 for merge)
    form: str = "full"  # student form while this phase trains: full | lora
    teacher: str = "previous"  # previous (the stage's teacher) | skip_level (stage.skip_level_steps)
    lr: float | None = None  # student learning rate; None = optim defaults by kind and form
    discriminator_lr: float | None = None  # None = optim.discriminator_lr, else the student's lr

    def __post_init__(self):
        _check_choice("kind", self.kind, PHASE_KINDS)
        _check_choice("form", self.form, STUDENT_FORMS)
        _check_choice("teacher", self.teacher, TEACHER_SOURCES)
        if self.steps < 0:
            raise RecipeError(f"steps: must be >= 0, got {self.steps}")
        if self.kind == "merge" and self.steps != 0:
            raise RecipeError(f"steps: a merge phase trains nothing, so steps must be 0, got {self.steps}")
        for name in ("lr", "discriminator_lr"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:  # also refuses NaN and Inf
                raise RecipeError(f"{name}: a learning rate must be in (0, 1] or null, got {value}")


@dataclass
class StageConfig:
    teacher_steps: int = 32  # steps of the teacher's trailing grid (N·n in METHOD.md §2)
    student_steps: int = 8  # steps of the student's trailing grid (N)
    phases: list[PhaseConfig] = field(default_factory=list)  # in order
    guidance_scale: float = 0.0  # teacher CFG in this stage (paper: 6 in stage 0, else none)
    skip_level_steps: int = 0  # grid of the earlier student used by teacher=skip_level phases
    train_timesteps: list[int] = field(default_factory=list)  # [] = METHOD.md §2 default
    renoise: str = "auto"  # re-noise D inputs: auto (on for ≤ 2-step students) | on | off

    def __post_init__(self):
        for name in ("teacher_steps", "student_steps"):
            if not 1 <= getattr(self, name) <= 1000:
                raise RecipeError(f"{name}: must be in 1..1000, got {getattr(self, name)}")
        if self.teacher_steps % self.student_steps:
            raise RecipeError(
                f"teacher_steps: {self.teacher_steps} must be a multiple of student_steps "
                f"{self.student_steps} so the student's grid lies on the teacher's")
        _check_choice("renoise", self.renoise, RENOISE_MODES)
        if not 0 <= self.guidance_scale <= 100:  # also refuses NaN and Inf
            raise RecipeError(f"guidance_scale: must be a finite number in [0, 100], got {self.guidance_scale}")
        if not self.phases:
            raise RecipeError("phases: a stage needs at least one phase")
        for t in self.train_timesteps:
            if not 0 <= t <= 999:
                raise RecipeError(f"train_timesteps: {t} is not a timestep in 0..999")


def _check_choice(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise RecipeError(f"{name}: {value!r} is not one of {list(allowed)}{did_you_mean(value, allowed)}")


def did_you_mean(value, allowed: Sequence) -> str:
    """' (did you mean 'x'?)' for a near miss among `allowed`, else ''."""
    import difflib

    close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass(frozen=True)
class TeacherPlan:
    stage: int  # stage whose final student is the teacher; BASE (−1) = the original base
    steps: int  # the teacher's trailing grid size for n-step targets
    guidance_scale: float  # classifier-free guidance on the teacher (0 = off)
    prediction_type: str  # how to read the teacher's output


@dataclass(frozen=True)
class PhasePlan:
    index: int  # position in the whole run
    stage: int  # stage index
    stage_name: str  # e.g. "8step": the student's step count names the stage's outputs
    name: str  # directory name, unique within the stage: "<i>_<kind>"
    kind: str  # one of PHASE_KINDS
    steps: int  # optimizer steps
    form: str  # student form in this phase
    student_steps: int
    prediction_type: str  # of the student in this phase: epsilon, or sample from x0_convert on
    teacher: TeacherPlan
    train_timesteps: tuple[int, ...]
    renoise: bool  # re-noise discriminator inputs (METHOD.md §3)
    lr: float | None
    discriminator_lr: float | None
    first_in_stage: bool
    last_in_stage: bool

    @property
    def adversarial(self) -> bool:
        return self.kind in ADVERSARIAL_KINDS

    @property
    def conditional(self) -> bool:
        return self.kind == "adv_conditional"


def stage_name(stage: StageConfig) -> str:
    return f"{stage.student_steps}step"


def expand_recipe(stages: Sequence[StageConfig], base_prediction_type: str = "epsilon") -> list[PhasePlan]:
    """The ordered phases of the whole recipe, with teachers and forms resolved.

    Teachers: stage 0's is the base model; stage k's is stage k−1's final student. A phase with
    teacher=skip_level uses the final student of the earlier stage whose student had
    `skip_level_steps` steps (METHOD.md §2: the 8-step model for 4→2, the 4-step for 2→1).
    The student predicts epsilon until an x0_convert phase, and x0 ("sample") after it,
    including in later stages.
    """
    if not stages:
        raise RecipeError("stages: the recipe needs at least one stage")
    plans: list[PhasePlan] = []
    prediction_type = base_prediction_type
    for s, stage in enumerate(stages):
        where = f"stages.{s}"
        if s > 0 and stage.teacher_steps != stages[s - 1].student_steps:
            raise RecipeError(
                f"{where}.teacher_steps: {stage.teacher_steps} must equal the previous stage's "
                f"student_steps {stages[s - 1].student_steps} (its student is this stage's teacher)")
        teacher_prediction = prediction_type
        stage_teacher = TeacherPlan(stage=s - 1 if s > 0 else BASE, steps=stage.teacher_steps,
                                    guidance_scale=stage.guidance_scale,
                                    prediction_type=teacher_prediction)
        train_timesteps = tuple(stage.train_timesteps) or tuple(student_timesteps(stage.student_steps))
        renoise = {"on": True, "off": False, "auto": stage.student_steps <= 2}[stage.renoise]
        _check_forms(stage, where)
        for p, phase in enumerate(stage.phases):
            if phase.kind == "x0_convert":
                prediction_type = "sample"
            teacher = stage_teacher
            if phase.teacher == "skip_level":
                teacher = _skip_level_teacher(stages, s, stage, f"{where}.phases.{p}", plans)
            plans.append(PhasePlan(
                index=len(plans), stage=s, stage_name=stage_name(stage), name=f"{p}_{phase.kind}",
                kind=phase.kind, steps=phase.steps, form=phase.form,
                student_steps=stage.student_steps, prediction_type=prediction_type,
                teacher=teacher, train_timesteps=train_timesteps, renoise=renoise, lr=phase.lr,
                discriminator_lr=phase.discriminator_lr, first_in_stage=p == 0,
                last_in_stage=p == len(stage.phases) - 1))
    return plans


def _check_forms(stage: StageConfig, where: str) -> None:
    """LoRA phases come before a merge; full phases after it (or with no LoRA in the stage)."""
    form = stage.phases[0].form
    for p, phase in enumerate(stage.phases):
        if phase.kind == "merge":
            if form != "lora":
                raise RecipeError(f"{where}.phases.{p}: merge needs a LoRA student before it")
            form = "full"
            continue
        if phase.form != form:
            hint = " (insert a merge phase first)" if form == "lora" else ""
            raise RecipeError(f"{where}.phases.{p}.form: {phase.form!r} but the student is "
                              f"{form!r} at this point{hint}")


def _skip_level_teacher(stages, s, stage, where, plans) -> TeacherPlan:
    if stage.skip_level_steps <= 0:
        raise RecipeError(f"{where}.teacher: skip_level needs stages.{s}.skip_level_steps")
    earlier = [k for k in range(s) if stages[k].student_steps == stage.skip_level_steps]
    if not earlier:
        raise RecipeError(
            f"stages.{s}.skip_level_steps: no earlier stage has a {stage.skip_level_steps}-step "
            f"student; allowed: {[stages[k].student_steps for k in range(s)]}")
    k = earlier[-1]
    last = [p for p in plans if p.stage == k][-1]
    return TeacherPlan(stage=k, steps=stage.skip_level_steps, guidance_scale=0.0,
                       prediction_type=last.prediction_type)


@dataclass(frozen=True)
class PhasePosition:
    phase: int  # index into the expanded recipe; len(plans) when the run is done
    step: int  # optimizer steps already taken inside that phase


def locate(plans: Sequence[PhasePlan], global_step: int) -> PhasePosition:
    """Which phase the optimizer step number `global_step` (0-based) falls in.

    Zero-step phases (merge) are never located: they happen between two steps, when the loop
    moves from the phase before them to the phase after.
    """
    remaining = global_step
    for plan in plans:
        if remaining < plan.steps:
            return PhasePosition(plan.index, remaining)
        remaining -= plan.steps
    return PhasePosition(len(plans), remaining)


def phase_start_step(plans: Sequence[PhasePlan], index: int) -> int:
    """Global step at which phase `index` begins."""
    return sum(p.steps for p in plans[:index])


# ----------------------------------------------------------------------------- recipe variants

def mse_only_recipe(stages: Sequence[StageConfig]) -> list[StageConfig]:
    """The same stages as plain progressive distillation: every adversarial phase becomes MSE
    on the full UNet (consecutive MSE phases fused), merges and LoRA phases disappear. The
    baseline the paper's adversarial objective is measured against (METHOD.md §7)."""
    out = []
    for stage in stages:
        phases: list[PhaseConfig] = []
        for phase in stage.phases:
            if phase.kind == "merge":
                continue
            adversarial = phase.kind in ADVERSARIAL_KINDS
            phase = replace(phase, kind="mse" if adversarial else phase.kind, form="full",
                            teacher="previous", lr=None if adversarial else phase.lr)
            kind = phase.kind
            if phases and phases[-1].kind == kind == "mse":
                phases[-1] = replace(phases[-1], steps=phases[-1].steps + phase.steps)
            else:
                phases.append(phase)
        out.append(replace(stage, phases=phases))
    return out


def lora_track_recipe(stages: Sequence[StageConfig]) -> list[StageConfig]:
    """Every phase trains one LoRA on the original base, carried across stages with no merges,
    so each stage's adapter is itself a LoRA users can apply to the base (METHOD.md §5). The
    x0 switch is dropped: a LoRA leaves conv_out to the base, and the released LoRAs are
    epsilon models."""
    return [replace(stage, phases=[replace(p, form="lora", lr=None) for p in stage.phases
                                   if p.kind not in ("merge", "x0_convert")])
            for stage in stages]


def direct_adversarial_recipe(stages: Sequence[StageConfig], student_steps: int) -> list[StageConfig]:
    """The non-progressive adversarial baseline of the mode-coverage claim (METHOD.md §7):
    one stage that goes straight from the base teacher to a `student_steps` student.

    The teacher is the base on the first stage's *student* grid with that stage's guidance
    (for the digits preset: the 32-step CFG teacher, the reference row of the benchmark), so
    one training step's teacher walk spans 32/N base steps instead of 2 or 4. The phases are
    those of the progressive recipe's stage that ends at `student_steps` (conditional, then
    unconditional; the x0 conversion first for one step), with skip-level teachers replaced by
    the base (a single stage has no earlier student), and their steps scaled so the total
    equals the progressive recipe's total up to and including that stage: the same budget."""
    ends = [k for k, stage in enumerate(stages) if stage.student_steps == student_steps]
    if not ends:
        raise RecipeError(f"student_steps: no stage of the recipe ends at {student_steps} steps; "
                          f"allowed: {[s.student_steps for s in stages]}")
    target = stages[ends[0]]
    budget = sum(p.steps for stage in stages[: ends[0] + 1] for p in stage.phases)
    own = sum(p.steps for p in target.phases)
    if own == 0:
        raise RecipeError(f"stages.{ends[0]}: a stage with no training steps has no budget to scale")
    scale = budget / own
    phases = [replace(p, teacher="previous", steps=round(p.steps * scale)) for p in target.phases]
    teacher_steps = stages[0].student_steps
    return [replace(target, teacher_steps=teacher_steps, phases=phases, skip_level_steps=0,
                    guidance_scale=stages[0].guidance_scale)]
