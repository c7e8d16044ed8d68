"""The run directory: every path a run reads or writes, named in one place.

    runs/NAME/
      config.yaml                                resolved config
      run.lock                                   PID and host of the run training here (train/lock.py)
      metrics.jsonl, wandb_id.txt                tracking
      samples/<stage>_<phase>_<tag>.png          validation grids
      stages/<stage>/<phase>/checkpoint-<K>/     resumable state (train/checkpoint.py)
      stages/<stage>/<phase>/final/              the student after that phase
      stages/<stage>/final/, stage.json          the stage's student, its exports' list
      export/                                    user-facing files (train/export.py), manifest.json

Stages are named by their student's step count ("8step"); `RunLayout` knows the names of
the recipe's stages so that "the final of stage 2" is one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from distill.phases import BASE, PhasePlan, StageConfig, stage_name


@dataclass(frozen=True)
class RunLayout:
    root: Path
    stage_names: tuple[str, ...]  # by stage index

    @classmethod
    def for_stages(cls, root: str | Path, stages: Sequence[StageConfig]) -> RunLayout:
        return cls(Path(root), tuple(stage_name(s) for s in stages))

    # --------------------------------------------------------------- run level
    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def lock_file(self) -> Path:
        return self.root / "run.lock"

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def wandb_id_file(self) -> Path:
        return self.root / "wandb_id.txt"

    @property
    def samples_dir(self) -> Path:
        return self.root / "samples"

    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    # --------------------------------------------------------------- stages
    def stage_dir(self, stage: int) -> Path:
        return self.root / "stages" / self.stage_names[stage]

    def stage_final(self, stage: int) -> Path:
        """The stage's student: the next stage's starting point and teacher."""
        return self.stage_dir(stage) / "final"

    def stage_record(self, stage: int) -> Path:
        """stage.json: the stage's step count, prediction type and its exports."""
        return self.stage_dir(stage) / "stage.json"

    # --------------------------------------------------------------- phases
    def phase_dir(self, plan: PhasePlan) -> Path:
        return self.stage_dir(plan.stage) / plan.name

    def phase_final(self, plan: PhasePlan) -> Path:
        return self.phase_dir(plan) / "final"

    def sample_grid(self, plan: PhasePlan, tag: str) -> Path:
        return self.samples_dir / f"{plan.stage_name}_{plan.name}_{tag}.png"

    # --------------------------------------------------------------- where a phase starts
    def student_start(self, plan: PhasePlan, plans: Sequence[PhasePlan]) -> Path | None:
        """Where this phase's student starts: the previous phase's final, the previous stage's
        final (its student becomes this stage's starting point), or None for the base model."""
        if not plan.first_in_stage:
            return self.phase_final(plans[plan.index - 1])
        return None if plan.stage == 0 else self.stage_final(plan.stage - 1)

    def discriminator_source(self, plan: PhasePlan, plans: Sequence[PhasePlan]) -> Path | None:
        """The final of the latest earlier adversarial phase of the same stage: its saved
        discriminator carries into this phase (METHOD.md §4, re-initialised per stage)."""
        for earlier in reversed(plans[: plan.index]):
            if earlier.stage != plan.stage:
                return None
            if earlier.adversarial:
                return self.phase_final(earlier)
        return None

    def teacher_source(self, plan: PhasePlan) -> Path | None:
        """The teacher's weights: a stage final, or None for the original base."""
        return None if plan.teacher.stage == BASE else self.stage_final(plan.teacher.stage)
