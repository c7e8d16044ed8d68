"""The training loop end to end, in real subprocesses on the tiny digits model.

Covers: the whole tiny recipe (all stages, exports, grids, metrics, wandb offline with images,
an injected non-finite step), resume after SIGKILL inside a phase giving the same weights as an
uninterrupted run, stopping after too many non-finite steps with the checkpoint kept, and
two processes under `accelerate launch` (gloo on CPU) with both ranks agreeing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import subprocess_env, write_short_config
from safetensors.torch import load_file

from train.tracking import read_metrics

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["32step", "8step", "4step", "2step", "1step"]

def _env() -> dict:
    return subprocess_env()


def _train_cmd(config: Path | str, out: Path, cache: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "train", str(config), f"output_dir={out}", f"model.cache_dir={cache}",
            *overrides]


def _run(cmd: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _short_config(tmp_path: Path) -> Path:
    return write_short_config(tmp_path)


@pytest.fixture(scope="module")
def tiny_run(digits_cache, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_run") / "run"
    result = _run(_train_cmd("configs/tiny.yaml", out, digits_cache, "logging.wandb=true",
                             "runtime.fault_nonfinite_steps=[4]"))
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_tiny_recipe_runs_every_stage_and_phase(tiny_run):
    for stage in STAGES:
        final = tiny_run / "stages" / stage / "final"
        assert (final / "unet.safetensors").is_file() and (final / "student.json").is_file()
        assert list((tiny_run / "samples").glob(f"{stage}_*_final.png"))
    assert json.loads((tiny_run / "stages/1step/final/student.json").read_text())["prediction_type"] == "sample"
    assert json.loads((tiny_run / "stages/8step/final/student.json").read_text())["prediction_type"] == "epsilon"
    # merge phases leave a plain UNet (no adapter); LoRA phases keep one
    assert not (tiny_run / "stages/8step/2_merge/final/lora.safetensors").exists()
    assert (tiny_run / "stages/8step/1_adv_unconditional/final/lora.safetensors").exists()
    # finished phases keep no resumable checkpoints
    assert not list((tiny_run / "stages").glob("*/*/checkpoint-*"))
    assert (tiny_run / "config.yaml").is_file()


def test_metrics_cover_every_phase_with_losses(tiny_run):
    rows = [r for r in read_metrics(tiny_run) if "step" in r and "event" not in r]
    phases = {(r["stage"], r["phase"]) for r in rows}
    assert len(phases) == 13  # 16 phases minus 3 merges
    adversarial = [r for r in rows if "adv" in r["phase"]]
    assert adversarial and all({"loss_d", "loss_g", "d_acc_real", "d_acc_fake"} <= r.keys() for r in adversarial)
    assert all(r["samples_per_s"] > 0 for r in rows)


def test_injected_nonfinite_step_is_skipped_and_run_continues(tiny_run):
    rows = [r for r in read_metrics(tiny_run) if "step_ok" in r]
    bad = [r for r in rows if not r["step_ok"]]
    assert [r["global_step"] for r in bad] == [5]  # global step 4 is the 5th step
    assert rows[-1]["global_step"] == 27


def test_wandb_offline_run_has_images(tiny_run):
    runs = list((tiny_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    images = list(runs[0].glob("files/media/images/**/*.png"))
    assert len(images) >= len(STAGES)
    assert (tiny_run / "wandb_id.txt").read_text().strip() in runs[0].name


def test_exports_written_per_stage(tiny_run):
    names = sorted(p.name for p in (tiny_run / "export").glob("*.safetensors"))
    assert "tiny_lightning_4step_unet.safetensors" in names
    assert "tiny_lightning_1step_unet_x0.safetensors" in names
    # #12: every file kind a user's tool loads, for every stage
    export = tiny_run / "export"
    for steps in (32, 8, 4, 2):
        for stem in (f"{steps}step_unet", f"{steps}step_lora", f"{steps}step"):
            assert (export / f"tiny_lightning_{stem}.safetensors").is_file(), stem
            assert (export / f"tiny_lightning_{stem}_comfyui.json").is_file(), stem
        assert (export / f"tiny_lightning_{steps}step_samples.png").is_file()
        lora = load_file(export / f"tiny_lightning_{steps}step_lora.safetensors")
        assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
                   for k in lora), "LoRA keys in the original SDXL names"
    for stem in ("1step_unet_x0", "1step_x0"):
        assert (export / f"tiny_lightning_{stem}.safetensors").is_file()
        assert (export / f"tiny_lightning_{stem}_comfyui.json").is_file()
    card = (export / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: diffusers" in card
    assert all(f"tiny_lightning_{n}step_samples.png" in card for n in (32, 8, 4, 2, 1))


def test_rerun_of_finished_run_redoes_nothing(tiny_run, digits_cache):
    before = (tiny_run / "stages/4step/final/unet.safetensors").stat().st_mtime_ns
    rows_before = len(read_metrics(tiny_run))
    lost_export = tiny_run / "export/tiny_lightning_4step_unet.safetensors"
    lost_export.unlink()  # a user deleted an export: the rerun writes it again, trains nothing
    result = _run(_train_cmd("configs/tiny.yaml", tiny_run, digits_cache))
    assert result.returncode == 0, result.stderr[-3000:]
    assert lost_export.is_file()
    assert (tiny_run / "stages/4step/final/unet.safetensors").stat().st_mtime_ns == before
    assert not [r for r in read_metrics(tiny_run)[rows_before:] if "step_ok" in r]


@pytest.mark.parametrize("ema_decay", ["0.0", "0.9"], ids=["no_ema", "ema"])
def test_resume_after_kill_matches_uninterrupted_run(digits_cache, tmp_path, ema_decay):
    """Killed inside the run's second phase; with an EMA the resumed phase must restore its
    shadow (and find as much saved state as it registers: #10's stale-EMA bug)."""
    config = _short_config(tmp_path)
    overrides = ("checkpoint.every_steps=2", "checkpoint.keep_last=2", f"student.ema_decay={ema_decay}")
    straight = tmp_path / "straight"
    result = _run(_train_cmd(config, straight, digits_cache, *overrides))
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    phase_dir = killed / "stages/2step/0_adv_conditional"
    proc = subprocess.Popen(_train_cmd(config, killed, digits_cache, *overrides), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and not (phase_dir / "checkpoint-4").exists():
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (phase_dir / "final").exists(), "killed too late: the phase had finished"

    result = _run(_train_cmd(config, killed, digits_cache, *overrides))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed 2step/0_adv_conditional at step" in result.stderr
    a = load_file(straight / "stages/2step/final/unet.safetensors")
    b = load_file(killed / "stages/2step/final/unet.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, worst
    # and the phase really trained: weights differ from the merge input
    merged = load_file(killed / "stages/2step/1_merge/final/unet.safetensors")
    assert max(float((merged[k] - b[k]).abs().max()) for k in b) > 0


def test_too_many_nonfinite_steps_stop_the_run_and_keep_the_checkpoint(digits_cache, tmp_path):
    config = _short_config(tmp_path)
    out = tmp_path / "nan"
    result = _run(_train_cmd(config, out, digits_cache, "checkpoint.every_steps=2",
                             "runtime.max_nonfinite_steps=2", "runtime.fault_nonfinite_steps=[6,7]"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: 2 non-finite steps in a row at 2step/0_adv_conditional step 5" in result.stderr
    kept = out / "stages/2step/0_adv_conditional/checkpoint-4"
    assert (kept / "counters.json").is_file()
    assert json.loads((kept / "counters.json").read_text())["step"] == 4


def test_a_phase_of_only_skipped_steps_publishes_no_final(digits_cache, tmp_path):
    """Every step of 2step/0_adv_conditional non-finite, fewer in a row than
    runtime.max_nonfinite_steps: the phase ends with more than runtime.max_skipped_fraction of
    its steps skipped, so it stops with one line, exit 2 and no final; its checkpoint stays."""
    config = write_short_config(tmp_path, adversarial_steps=4)
    out = tmp_path / "skipped"
    result = _run(_train_cmd(config, out, digits_cache, "checkpoint.every_steps=2",
                             "runtime.max_nonfinite_steps=10", "runtime.fault_nonfinite_steps=[2,3,4,5]"))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    phase = out / "stages/2step/0_adv_conditional"
    lines = [x for x in result.stderr.splitlines() if x.startswith("error: ")]
    assert lines == [f"error: 4 of 4 steps of 2step/0_adv_conditional were skipped as non-finite "
                     f"(runtime.max_skipped_fraction=0.5); no final was published ({phase}): lower the "
                     f"learning rate (or check the data) and re-run: the phase resumes from its last "
                     f"checkpoint (delete that folder to start the phase over)"]
    assert not (phase / "final").exists() and not (out / "stages/2step/final").exists()
    assert json.loads((phase / "checkpoint-2/counters.json").read_text())["skipped_total"] == 2
    assert (out / "stages/8step/final/unet.safetensors").is_file()  # the finished stage is kept


def test_accelerate_two_processes_agree(digits_cache, tmp_path):
    config = _short_config(tmp_path)
    out = tmp_path / "ddp"
    # accelerate's `--cpu --num_processes 2` needs mpirun; its torchrun path (`--multi_gpu`)
    # with ACCELERATE_USE_CPU=1 runs two gloo processes on one machine (README, Multi-GPU).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "29517",
           "-m", "train", str(config), f"output_dir={out}", f"model.cache_dir={digits_cache}"]
    result = subprocess.run(cmd, cwd=ROOT, env=dict(_env(), ACCELERATE_USE_CPU="1"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ends = [r for r in read_metrics(out) if r.get("event") == "phase_end"]
    assert len(ends) == 3
    for row in ends:
        sums = row["rank_weight_checksums"]
        assert len(sums) == 2 and sums[0] == pytest.approx(sums[1], rel=1e-12)
    assert torch.isfinite(torch.stack([v.float().sum() for v in
                                       load_file(out / "stages/2step/final/unet.safetensors").values()])).all()


def test_discriminator_carries_across_the_stage_and_restarts_per_stage(tiny_run):
    """METHOD.md §4 (#10): one discriminator per stage. The unconditional heads trained in the
    LoRA phase continue, with their Adam moments, in the full-UNet phase after the merge; the
    conditional heads are kept beside them; the next stage starts fresh."""
    stage = tiny_run / "stages/8step"
    cond = load_file(stage / "0_adv_conditional/final/discriminator.safetensors")
    lora_uncond = load_file(stage / "1_adv_unconditional/final/discriminator.safetensors")
    full_uncond = load_file(stage / "3_adv_unconditional/final/discriminator.safetensors")
    assert cond and all(k.startswith(("heads.conditional.", "adam.heads.conditional.")) for k in cond)
    uncond_steps = [k for k in full_uncond if k.startswith("adam.heads.unconditional.") and k.endswith(".step")]
    assert uncond_steps
    # 2 steps in each of the two unconditional phases (configs/tiny.yaml): the moments carried
    assert {float(lora_uncond[k]) for k in uncond_steps} == {2.0}
    assert {float(full_uncond[k]) for k in uncond_steps} == {4.0}
    # the conditional heads ride along unchanged; the unconditional ones trained on
    assert all(torch.equal(cond[k], full_uncond[k]) for k in cond)
    assert any(not torch.equal(lora_uncond[k], full_uncond[k]) for k in lora_uncond if k.startswith("heads."))
    # the next stage's first adversarial phase starts from fresh heads: Adam at step 2, not 4+
    next_cond = load_file(tiny_run / "stages/4step/0_adv_conditional/final/discriminator.safetensors")
    assert {float(v) for k, v in next_cond.items() if k.endswith(".step")} == {2.0}
