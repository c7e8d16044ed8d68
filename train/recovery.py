"""Before a (re-)run trusts its finals: verify the ones it will read, set the damaged aside.

A run reads a phase's final as the next phase's start, a stage's final as a later stage's
start and teacher, and the stage finals again to export them. `set_aside_damaged_finals`
walks the recipe once, before the first phase is built, and verifies (train/manifest.py)
every final the remaining work will read plus every stage final (the run's product). A
damaged one is renamed `final.corrupt` with a warning; the loop then no longer finds it and
rebuilds it the usual way: a stage final is copied again from its last phase's final, a phase
final comes from resuming its phase's checkpoints when they exist, else from re-running the
phase. Rebuilding one may need finals that were not needed before, so the walk repeats until
every needed final is intact. Since every step derives from (seed, rank, step), a rebuilt
final equals the lost one and the finals after it stay valid.

Finals nothing will read again (a finished phase in the middle of a finished stage) are left
alone: re-running their phase would cost hours and change nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from distill.phases import PhasePlan
from train.files import set_aside
from train.layout import RunLayout
from train.models import is_complete, student_problems

log = logging.getLogger("train")


def finals_to_verify(layout: RunLayout, plans: Sequence[PhasePlan]) -> list[Path]:
    """The existing finals the remaining work reads, and every existing stage final."""
    wanted: list[Path] = []
    for plan in plans:
        if not is_complete(layout.phase_final(plan)):
            wanted.append(layout.student_start(plan, plans))
            if plan.kind != "merge":
                wanted.append(layout.teacher_source(plan))
                if plan.stage > 0:  # build_teacher compares the teacher with the stage's start
                    wanted.append(layout.stage_final(plan.stage - 1))
        if plan.last_in_stage:
            stage_final = layout.stage_final(plan.stage)
            wanted.append(stage_final if is_complete(stage_final) else layout.phase_final(plan))
    return list(dict.fromkeys(p for p in wanted if p is not None and is_complete(p)))


def set_aside_damaged_finals(layout: RunLayout, plans: Sequence[PhasePlan]) -> list[Path]:
    """Main process, before the loop. Returns the set-aside copies' paths."""
    aside = []
    while True:
        damaged = next(((p, problems) for p in finals_to_verify(layout, plans)
                        if (problems := student_problems(p))), None)
        if damaged is None:
            return aside
        path, problems = damaged
        stage_level = path.parent.parent.name == "stages"
        then = ("copied again from its last phase's final" if stage_level else
                "rebuilt from its phase's checkpoints if any remain, else its phase is re-run")
        log.warning("final %s is damaged (%s): it is set aside and %s", path, "; ".join(problems), then)
        aside.append(set_aside(path))
