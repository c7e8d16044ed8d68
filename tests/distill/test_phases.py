"""Recipe expansion and the step → phase map."""

from pathlib import Path

import pytest

from distill.phases import (
    BASE,
    PhaseConfig,
    RecipeError,
    StageConfig,
    expand_recipe,
    locate,
    phase_start_step,
)
from train.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_sdxl_lightning_recipe_has_the_papers_phase_order():
    plans = expand_recipe(load_config(ROOT / "configs/sdxl_lightning.yaml").stages)
    got = [(p.stage_name, p.kind, p.form) for p in plans]
    adversarial = [("adv_conditional", "lora"), ("adv_unconditional", "lora"), ("merge", "lora"),
                   ("adv_unconditional", "full")]
    expected = [("32step", "mse", "full")]
    for name in ("8step", "4step", "2step"):
        expected += [(name, kind, form) for kind, form in adversarial]
    expected += [("1step", "x0_convert", "full"), ("1step", "adv_conditional", "full"),
                 ("1step", "adv_unconditional", "full")]
    assert got == expected
    # Stage 0: the base with CFG 6, 128-step teacher grid.
    assert plans[0].teacher.stage == BASE and plans[0].teacher.guidance_scale == 6.0
    assert plans[0].teacher.steps == 128
    # Each later stage's teacher is the previous stage's student, without CFG.
    by_stage = {}
    for p in plans:
        by_stage.setdefault(p.stage_name, []).append(p)
    assert all(p.teacher.stage == 0 and p.teacher.guidance_scale == 0 for p in by_stage["8step"])
    # 4 -> 2: unconditional phases use the 8-step model (skip level), the conditional one the 4-step.
    two = by_stage["2step"]
    assert two[0].teacher.stage == 2 and two[0].teacher.steps == 4
    assert [p.teacher.steps for p in two if p.kind == "adv_unconditional"] == [8, 8]
    assert all(p.teacher.stage == 1 for p in two if p.kind == "adv_unconditional")
    # 2 -> 1: x0 from the x0_convert phase on; skip-level teacher is the 4-step model.
    one = by_stage["1step"]
    assert [p.prediction_type for p in one] == ["sample"] * 3
    assert one[-1].teacher.stage == 2 and one[-1].teacher.steps == 4
    # Re-noising on for the 2- and 1-step students only; their training timesteps are the 4-step grid.
    assert {p.student_steps for p in plans if p.renoise} == {1, 2}
    assert one[0].train_timesteps == (999, 749, 499, 249)
    assert by_stage["8step"][0].train_timesteps == (999, 874, 749, 624, 499, 374, 249, 124)


def _stage(**kw):
    return StageConfig(**{"teacher_steps": 8, "student_steps": 4,
                          "phases": [PhaseConfig(kind="mse", steps=3)], **kw})


def test_forms_must_merge_before_full():
    phases = [PhaseConfig(kind="adv_conditional", steps=2, form="lora"),
              PhaseConfig(kind="adv_unconditional", steps=2, form="full")]
    with pytest.raises(RecipeError, match="insert a merge phase"):
        expand_recipe([_stage(phases=phases)])


def test_skip_level_needs_an_earlier_stage():
    phases = [PhaseConfig(kind="adv_unconditional", steps=2, teacher="skip_level")]
    with pytest.raises(RecipeError, match="skip_level_steps"):
        expand_recipe([_stage(phases=phases)])
    with pytest.raises(RecipeError, match="no earlier stage has a 16-step student"):
        expand_recipe([_stage(phases=phases, skip_level_steps=16)])


def test_teacher_chain_is_checked():
    with pytest.raises(RecipeError, match="must equal the previous stage's student_steps"):
        expand_recipe([_stage(), StageConfig(teacher_steps=8, student_steps=2,
                                             phases=[PhaseConfig(kind="mse", steps=1)])])
    with pytest.raises(RecipeError, match="multiple of student_steps"):
        StageConfig(teacher_steps=8, student_steps=3, phases=[PhaseConfig()])


def test_locate_maps_global_steps_and_skips_merges():
    plans = expand_recipe(load_config(ROOT / "configs/tiny.yaml").stages)
    assert locate(plans, 0).phase == 0
    assert locate(plans, 2) == locate(plans, 2)  # pure
    assert (locate(plans, 3).phase, locate(plans, 3).step) == (1, 0)  # mse has 3 steps
    merge = next(p for p in plans if p.kind == "merge")
    start = phase_start_step(plans, merge.index)
    assert locate(plans, start).phase == merge.index + 1  # a merge takes no step
    total = sum(p.steps for p in plans)
    assert locate(plans, total).phase == len(plans)
    for g in range(total):
        pos = locate(plans, g)
        assert phase_start_step(plans, pos.phase) + pos.step == g


def test_mse_only_recipe_replaces_adversarial_phases():
    from distill.phases import mse_only_recipe

    stages = load_config(ROOT / "configs/digits.yaml").stages
    plans = expand_recipe(mse_only_recipe(stages))
    assert {p.kind for p in plans} == {"mse", "x0_convert"}
    assert all(p.form == "full" for p in plans)
    # same stages, same total student steps per stage
    for before, after in zip(stages, mse_only_recipe(stages)):
        assert (before.teacher_steps, before.student_steps) == (after.teacher_steps, after.student_steps)
        assert sum(p.steps for p in before.phases) == sum(p.steps for p in after.phases)
    one = [p for p in plans if p.student_steps == 1]
    assert [p.kind for p in one] == ["x0_convert", "mse"] and one[-1].prediction_type == "sample"


def test_lora_track_recipe_is_all_lora_without_merges():
    from distill.phases import lora_track_recipe

    plans = expand_recipe(lora_track_recipe(load_config(ROOT / "configs/digits.yaml").stages))
    assert {p.form for p in plans} == {"lora"}
    assert not [p for p in plans if p.kind in ("merge", "x0_convert")]
    assert {p.prediction_type for p in plans} == {"epsilon"}
    assert [p.teacher.steps for p in plans if p.student_steps == 2 and p.kind == "adv_unconditional"] == [8, 8]


@pytest.mark.parametrize("steps", [4, 2, 1])
def test_direct_adversarial_recipe_is_one_stage_from_the_base_with_the_same_budget(steps):
    from distill.phases import BASE, RecipeError, direct_adversarial_recipe

    stages = load_config(ROOT / "configs/digits.yaml").stages
    direct = direct_adversarial_recipe(stages, steps)
    assert len(direct) == 1
    (stage,) = direct
    # Straight from the base teacher on its 32-step grid, with the first stage's guidance.
    assert (stage.teacher_steps, stage.student_steps) == (32, steps)
    assert stage.guidance_scale == stages[0].guidance_scale == 3.0
    plans = expand_recipe(direct)
    assert {p.teacher.stage for p in plans} == {BASE}
    assert {p.teacher.steps for p in plans} == {32}
    # The same phase kinds, in the same order, as the progressive stage that ends at `steps`.
    progressive = next(s for s in stages if s.student_steps == steps)
    assert [p.kind for p in stage.phases] == [p.kind for p in progressive.phases]
    assert any(p.kind == "adv_conditional" for p in plans)
    # The same budget: the progressive recipe's steps up to and including that stage (± rounding).
    end = stages.index(progressive)
    budget = sum(p.steps for s in stages[: end + 1] for p in s.phases)
    assert abs(sum(p.steps for p in plans) - budget) <= len(plans)
    if steps == 1:
        assert plans[0].kind == "x0_convert" and plans[-1].prediction_type == "sample"
    with pytest.raises(RecipeError, match="no stage of the recipe ends at 3 steps"):
        direct_adversarial_recipe(stages, 3)
