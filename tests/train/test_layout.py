"""RunLayout: every run-directory path, and where each phase's student and teacher come from."""

from pathlib import Path

from distill.phases import PhaseConfig, StageConfig, expand_recipe
from train.layout import RunLayout

STAGES = [
    StageConfig(teacher_steps=8, student_steps=4, phases=[PhaseConfig(kind="mse", steps=1)]),
    StageConfig(teacher_steps=4, student_steps=2, phases=[PhaseConfig(kind="mse", steps=1)]),
    StageConfig(teacher_steps=2, student_steps=1, skip_level_steps=4, phases=[
        PhaseConfig(kind="adv_conditional", steps=1, form="lora"),
        PhaseConfig(kind="merge", steps=0, form="lora"),
        PhaseConfig(kind="adv_unconditional", steps=1, form="full", teacher="skip_level")]),
]


def test_run_level_and_stage_paths(tmp_path):
    layout = RunLayout.for_stages(tmp_path / "run", STAGES)
    root = tmp_path / "run"
    assert layout.stage_names == ("4step", "2step", "1step")
    assert layout.config_file == root / "config.yaml"
    assert layout.metrics_file == root / "metrics.jsonl"
    assert layout.export_dir == root / "export"
    assert layout.stage_final(1) == root / "stages/2step/final"
    assert layout.stage_record(0) == root / "stages/4step/stage.json"


def test_phase_paths_and_where_students_and_teachers_start(tmp_path):
    layout = RunLayout.for_stages(tmp_path, STAGES)
    plans = expand_recipe(STAGES)
    mse, mse2, adv, merge, uncond = plans
    assert layout.phase_final(adv) == tmp_path / "stages/1step/0_adv_conditional/final"
    assert layout.sample_grid(merge, "final") == tmp_path / "samples/1step_1_merge_final.png"
    # stage 0 starts from the base; a stage's first phase from the previous stage's final;
    # later phases from the phase before them.
    assert layout.student_start(mse, plans) is None
    assert layout.student_start(mse2, plans) == layout.stage_final(0)
    assert layout.student_start(adv, plans) == layout.stage_final(1)
    assert layout.student_start(uncond, plans) == layout.phase_final(merge)
    # teachers: the base for stage 0, else the previous stage's final, and for skip-level
    # phases the earlier student whose grid is skip_level_steps (the 4-step model, stage 0)
    assert layout.teacher_source(mse) is None
    assert layout.teacher_source(mse2) == layout.stage_final(0)
    assert layout.teacher_source(adv) == layout.stage_final(1)
    assert layout.teacher_source(uncond) == layout.stage_final(0)


def test_paths_are_plain_paths_under_the_root(tmp_path):
    layout = RunLayout(Path("runs/x"), ("8step",))
    assert layout.phase_dir(expand_recipe(STAGES[:1])[0]).parts[:3] == ("runs", "x", "stages")
