"""Damaged rather than half-written: checkpoints, phase and stage finals and exports that are
truncated, emptied, garbled, missing a file or holding NaNs. Every case ends in a fallback that
keeps finished work, and the run's exports are then bitwise equal to an uninterrupted run's.

Two starting states, both real: `interrupted`, a run killed inside the 2-step stage's first
phase once its checkpoint-3 exists (checkpoints 2 and 3 kept, the 8-step stage finished), and
the finished reference run (or a copy of it rolled back to "killed between two phases").
The default run covers one damaged checkpoint and one garbled stage final together, plus the
recovery decisions in-process; `-m slow` runs each case on its own.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from faults import (
    copy_run,
    empty,
    export_differences,
    garble,
    kill9,
    one_line_error,
    reference_run,
    run_train,
    start_train,
    truncate,
)
from safetensors.torch import load_file, save_file

from distill.phases import expand_recipe
from train.config import load_config
from train.layout import RunLayout
from train.manifest import write_manifest
from train.recovery import set_aside_damaged_finals
from train.tracking import read_metrics, row_key

pytestmark = pytest.mark.e2e
PHASE = "stages/2step/0_adv_conditional"


@pytest.fixture(scope="module")
def reference(digits_cache, tmp_path_factory):
    return reference_run(digits_cache, tmp_path_factory)


@pytest.fixture(scope="module")
def interrupted(reference, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("interrupted") / "run"
    proc = start_train(reference.config, out, reference.cache)
    deadline = time.time() + 600
    # checkpoint-3 is renamed into place complete, and only then is the oldest (checkpoint-1)
    # pruned: wait for both, or a kill between them leaves three checkpoints behind
    while time.time() < deadline and not ((out / PHASE / "checkpoint-3").is_dir()
                                          and not (out / PHASE / "checkpoint-1").exists()):
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.01)
    kill9(proc)
    assert not (out / PHASE / "final").exists(), "killed too late"
    assert sorted(p.name for p in (out / PHASE).iterdir()) == ["checkpoint-2", "checkpoint-3"]
    return out


def _rerun(reference, run: Path):
    result = run_train(reference.config, run, reference.cache)
    assert result.returncode == 0, result.stderr[-4000:]
    assert export_differences(reference.run, run) == []
    return result


def _aside(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*.corrupt*"))


# ----------------------------------------------------------------------------- default


def test_damaged_checkpoint_and_garbled_stage_final_fall_back(reference, interrupted, tmp_path):
    """The newest checkpoint truncated (resume falls back to the previous one) and the 8-step
    stage final garbled in place, which its hard-linked phase final shares (both are set aside
    and the 8-step phase is trained again, never trained on)."""
    run = copy_run(interrupted, tmp_path / "run")
    truncate(run / PHASE / "checkpoint-3" / "model.safetensors")
    garble(run / "stages/8step/final/unet.safetensors")
    assert (run / "stages/8step/0_mse/final/unet.safetensors").stat().st_nlink == 2
    result = _rerun(reference, run)
    assert _aside(run) == [f"{PHASE}/checkpoint-3.corrupt", "stages/8step/0_mse/final.corrupt",
                           "stages/8step/final.corrupt"]
    assert "model.safetensors:" in result.stderr and "1 step(s) to redo" in result.stderr
    assert "resumed 2step/0_adv_conditional at step 2" in result.stderr
    assert "contents differ from the manifest's hash (garbled)" in result.stderr


def test_recovery_sets_aside_only_what_the_remaining_work_reads(reference, tmp_path):
    """In-process, on copies of the finished run: a damaged phase final in the middle of a
    finished stage is left alone (nothing reads it again); a stage final missing a file is set
    aside alone (its phase final, a separate link, is intact); one damaged in place takes its
    hard-linked phase final with it."""
    cfg = load_config(reference.run / "config.yaml")
    plans = expand_recipe(cfg.stages)

    run = copy_run(reference.run, tmp_path / "a")
    layout = RunLayout.for_stages(run, cfg.stages)
    (run / "stages/2step/1_merge/final/unet.safetensors").unlink()
    assert set_aside_damaged_finals(layout, plans) == []
    (run / "stages/2step/final/student.json").unlink()
    assert set_aside_damaged_finals(layout, plans) == [run / "stages/2step/final.corrupt"]

    run = copy_run(reference.run, tmp_path / "b")
    layout = RunLayout.for_stages(run, cfg.stages)
    empty(run / "stages/8step/final/student.json")
    assert set_aside_damaged_finals(layout, plans) == [run / "stages/8step/final.corrupt",
                                                       run / "stages/8step/0_mse/final.corrupt"]
    assert set_aside_damaged_finals(layout, plans) == []  # the walk has reached a fixed point

    # killed between a stage's last phase final and its stage final: that phase final missing
    # its weights (student.json intact) is not complete, so it is never copied into the stage
    run = copy_run(reference.run, tmp_path / "c")
    layout = RunLayout.for_stages(run, cfg.stages)
    shutil.rmtree(run / "stages/2step/final")
    (run / "stages/2step/stage.json").unlink()
    (run / "stages/2step/2_adv_unconditional/final/unet.safetensors").unlink()
    assert set_aside_damaged_finals(layout, plans) == [run / "stages/2step/2_adv_unconditional/final.corrupt"]


def test_orphans_missing_grid_and_metrics_rows_of_an_interrupted_stage_end(reference, tmp_path):
    """The finished run rolled back to a kill between the 2-step stage final's rename and its
    validation grid (no grid, no grid row, no stage.json, so no exports recorded), with the
    staging files that kills leave behind: the rerun removes those, renders the grid, logs its
    row once, exports bitwise equal to the reference, and adds no metrics row twice."""
    run = copy_run(reference.run, tmp_path / "run")
    grid = next((run / "samples").glob("2step_*_final.png"))
    grid.unlink()
    rows = (run / "metrics.jsonl").read_text().splitlines()
    kept = [r for r in rows if str(grid) not in r.replace(str(reference.run), str(run))]
    assert len(kept) == len(rows) - 1
    (run / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    (run / "stages/2step/stage.json").unlink()
    orphans = [run / "export/.tiny_lightning_2step_unet.safetensors.a1b2c3.tmp",
               run / "stages/2step/0_adv_conditional/checkpoint-3.tmp/model.safetensors",
               run / "samples/.2step_2_adv_unconditional_final.png.d4e5f6.tmp"]
    for orphan in orphans:
        orphan.parent.mkdir(parents=True, exist_ok=True)
        orphan.write_bytes(b"\0" * 100)
    result = _rerun(reference, run)
    assert "removed 3 leftover staging file(s) of interrupted writes" in result.stderr
    assert not list(run.rglob("*.tmp"))
    assert grid.is_file()
    image_rows = [r for r in read_metrics(run) if r.get("event") == "image" and r["path"] == str(grid)]
    assert len(image_rows) == 1
    assert [row_key(r) for r in read_metrics(run)] == [row_key(r) for r in read_metrics(reference.run)]
    assert _aside(run) == []


# ----------------------------------------------------------------------------- slow: one case each


CHECKPOINT_DAMAGE = {
    "model_truncated": lambda c: truncate(c / "model.safetensors"),
    "model_emptied": lambda c: empty(c / "model.safetensors"),
    "model_garbled": lambda c: garble(c / "model.safetensors"),
    "optimizer_missing": lambda c: (c / "optimizer.bin").unlink(),
    "discriminator_missing": lambda c: (c / "model_1.safetensors").unlink(),
    "counters_garbled": lambda c: (c / "counters.json").write_text('{"phase": 1, "st'),
    "manifest_missing": lambda c: (c / "manifest.json").unlink(),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(CHECKPOINT_DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_the_previous(reference, interrupted, tmp_path, damage):
    run = copy_run(interrupted, tmp_path / "run")
    CHECKPOINT_DAMAGE[damage](run / PHASE / "checkpoint-3")
    result = _rerun(reference, run)
    assert _aside(run) == [f"{PHASE}/checkpoint-3.corrupt"]
    assert "resuming from" in result.stderr and "1 step(s) to redo" in result.stderr


@pytest.mark.slow
def test_only_checkpoint_damaged_restarts_the_phase(reference, interrupted, tmp_path):
    """keep_last: 1's situation: the one checkpoint is damaged, the phase starts over."""
    run = copy_run(interrupted, tmp_path / "run")
    shutil.rmtree(run / PHASE / "checkpoint-2")
    truncate(run / PHASE / "checkpoint-3" / "model.safetensors")
    result = _rerun(reference, run)
    assert _aside(run) == [f"{PHASE}/checkpoint-3.corrupt"]
    assert "the phase starts over (3 step(s) to redo)" in result.stderr


def _rolled_back_to_after(reference, tmp_path: Path) -> Path:
    """The finished reference, rolled back to "killed right after 2step/0_adv_conditional's
    final": what comes later in the 2-step stage is removed."""
    run = copy_run(reference.run, tmp_path / "run")
    for later in ("stages/2step/1_merge", "stages/2step/2_adv_unconditional", "stages/2step/final",
                  "stages/2step/stage.json"):
        path = run / later
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for export in (run / "export").glob("tiny_lightning_2step*"):
        export.unlink()
    return run


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_phase_final_read_by_the_next_phase_is_rebuilt(reference, tmp_path, damage):
    run = _rolled_back_to_after(reference, tmp_path)
    weights = run / PHASE / "final" / "unet.safetensors"
    weights.unlink() if damage == "missing" else truncate(weights)
    result = _rerun(reference, run)
    assert _aside(run) == [f"{PHASE}/final.corrupt"]
    assert "its phase is re-run" in result.stderr


@pytest.mark.slow
def test_stage_final_missing_its_weights_is_copied_again(reference, tmp_path):
    run = copy_run(reference.run, tmp_path / "run")
    (run / "stages/2step/final/unet.safetensors").unlink()  # the phase final's link survives
    result = _rerun(reference, run)
    assert _aside(run) == ["stages/2step/final.corrupt"]
    assert "copied again from its last phase's final" in result.stderr
    assert "resumed" not in result.stderr  # no phase trained again


@pytest.mark.slow
def test_stage_final_with_nan_weights_and_a_valid_manifest_is_not_trained_on(reference, interrupted, tmp_path):
    """NaNs that a manifest cannot catch (written with it): the finiteness check does."""
    run = copy_run(interrupted, tmp_path / "run")
    for final in ("stages/8step/final", "stages/8step/0_mse/final"):
        path = run / final / "unet.safetensors"
        tensors = load_file(path)
        name = next(iter(tensors))
        tensors[name] = tensors[name].clone().fill_(float("nan"))
        path.unlink()
        save_file(tensors, path)
        os.unlink(run / final / "manifest.json")
        write_manifest(run / final)
    result = _rerun(reference, run)
    assert "stages/8step/final.corrupt" in _aside(run)
    assert "non-finite weights" in result.stderr


@pytest.mark.slow
def test_damaged_exports_stale_lock_and_torn_metrics_of_a_finished_run(reference, tmp_path):
    run = copy_run(reference.run, tmp_path / "run")
    garble(run / "export/tiny_lightning_2step_unet.safetensors")
    (run / "export/tiny_lightning_8step_lora.safetensors").unlink()
    (run / "run.lock").write_text(json.dumps({"pid": 999999, "host": "gone"}))  # a crashed run's
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"global_step": 3, "lo')  # a row torn by a kill
    result = _rerun(reference, run)
    assert "exports of stage 2step damaged or missing" in result.stderr
    assert "exports of stage 8step damaged or missing" in result.stderr
    assert _aside(run) == []


@pytest.mark.slow
def test_export_cli_refuses_a_damaged_stage_final(reference, tmp_path):
    import subprocess
    import sys

    from conftest import subprocess_env
    run = copy_run(reference.run, tmp_path / "run")
    truncate(run / "stages/2step/final/unet.safetensors")
    result = subprocess.run([sys.executable, "-m", "train.export", str(run), "--stages", "2"],
                            capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert result.returncode == 2
    line = one_line_error(result.stderr)
    assert "damaged student" in line and "re-run the training command" in line

