"""Graceful stops: SIGTERM, SIGINT (to the whole process group, as Ctrl-C sends it, with a
DataLoader worker) and SIGUSR1 in real `python -m train` subprocesses, then the same command.

In the middle of a phase the run finishes the step in progress, writes a complete checkpoint
of it, prints one `stopped:` line and exits 75; no step is lost (the checkpoint's step is the
last step logged), no staging file is left, and the resumed run's exports are bitwise equal to
an uninterrupted run's, with no metrics row twice. The checkpoint falls off the every_steps
schedule (every 4 steps, the stop at step 5, 6 or 7), so the resume also has to find its place
in the data stream (`Counters.stream_start`). Under `accelerate launch`, a signal to one rank
stops both after the same step, each writing its part of one checkpoint.
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
from conftest import subprocess_env
from faults import export_differences, reliability_config

from train.checkpoint import complete_checkpoints
from train.errors import STOPPED_STATUS
from train.manifest import manifest_problems
from train.tracking import read_metrics, row_key

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
PHASE = "stages/2step/0_adv_conditional"  # 8 steps, global steps 3..10
# one DataLoader worker: Ctrl-C reaches it too (the process group), and it must not end the run
OVERRIDES = ("checkpoint.every_steps=4", "checkpoint.keep_last=1", "data.num_workers=1")


def _cmd(config: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train", str(config), f"output_dir={out}", f"model.cache_dir={cache}",
            *OVERRIDES, *extra]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def straight(digits_cache, tmp_path_factory):
    """The uninterrupted run with the same checkpoint schedule (config, run folder)."""
    root = tmp_path_factory.mktemp("signals")
    config = reliability_config(root)
    result = _run(_cmd(config, root / "straight", digits_cache, *_adversarial(8)))
    assert result.returncode == 0, result.stderr[-4000:]
    return config, root / "straight"


def _adversarial(steps: int) -> tuple[str, ...]:
    return (f"stages.1.phases.0.steps={steps}",)


def _logged_steps(run: Path) -> list[dict]:
    return [r for r in read_metrics(run) if "step_ok" in r]


def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    sink = log.open("w")
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=sink, stderr=sink,
                            start_new_session=True)


def _wait_for_step(proc: subprocess.Popen, run: Path, global_step: int) -> None:
    deadline = time.time() + 600
    while not any(r["global_step"] >= global_step for r in _logged_steps(run)):
        assert proc.poll() is None and time.time() < deadline, "the run ended before the signal"
        time.sleep(0.01)


@pytest.mark.parametrize("signum, to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)],
                         ids=["SIGTERM", "SIGINT_to_the_group"])
def test_a_signal_mid_phase_loses_no_step_and_resumes_bitwise(straight, digits_cache, tmp_path, signum, to_group):
    config, reference = straight
    out = tmp_path / "run"
    extra = _adversarial(8)
    proc = _start(_cmd(config, out, digits_cache, *extra), tmp_path / "stopped.log")
    _wait_for_step(proc, out, 6)  # 2step/0_adv_conditional step 4 logged: its checkpoint is next
    sent = time.time()
    (os.killpg if to_group else os.kill)(proc.pid, signum)
    status = proc.wait(timeout=120)
    seconds = time.time() - sent
    log = (tmp_path / "stopped.log").read_text()
    assert status == STOPPED_STATUS, log[-4000:]
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log[-4000:]
    (line,) = [x for x in log.splitlines() if x.startswith("stopped: ")]
    checkpoints = complete_checkpoints(out / PHASE)
    assert len(checkpoints) == 1, checkpoints
    step, ckpt = checkpoints[0]
    assert line == (f"stopped: on {signal.Signals(signum).name} at 2step/0_adv_conditional step {step} of 8, "
                    f"after a complete checkpoint ({ckpt}): run the same command to resume")
    assert step in (5, 6, 7), step  # off the every-4 schedule, before the phase's end
    assert manifest_problems(ckpt) == []
    assert json.loads((ckpt / "counters.json").read_text())["stream_start"] == 4
    last = _logged_steps(out)[-1]
    assert (last["phase"], last["step"]) == ("0_adv_conditional", step)  # no step lost
    assert not list(out.rglob("*.tmp")) and not (out / PHASE / "final").exists()
    print(f"{signal.Signals(signum).name}: stopped at step {step} ({seconds:.1f} s after the signal), 0 steps lost")

    result = _run(_cmd(config, out, digits_cache, *extra))
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"resumed 2step/0_adv_conditional at step {step}" in result.stderr
    assert export_differences(reference, out) == []
    keys = [row_key(r) for r in read_metrics(out)]
    assert keys == [row_key(r) for r in read_metrics(reference)]  # every row once, in order


def test_sigusr1_during_start_up_stops_before_the_first_phase(straight, digits_cache, tmp_path):
    """SLURM's --signal=USR1@T before a time limit, while the models load: nothing to save."""
    config, _ = straight
    out = tmp_path / "run"
    proc = _start(_cmd(config, out, digits_cache), tmp_path / "stopped.log")
    deadline = time.time() + 120
    while not (out / "config.yaml").is_file():  # the handlers are installed, the lock taken
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == STOPPED_STATUS
    log = (tmp_path / "stopped.log").read_text()
    (line,) = [x for x in log.splitlines() if x.startswith("stopped: ")]
    assert line == (f"stopped: on SIGUSR1 before 8step/0_mse; every finished phase is kept ({out}): "
                    "run the same command to resume")
    assert not (out / "stages").exists() and _logged_steps(out) == []


def _children(pid: int) -> list[int]:
    return [int(c) for t in Path(f"/proc/{pid}/task").iterdir()
            for c in (t / "children").read_text().split()]


def test_a_signal_to_one_of_two_ranks_stops_both_after_the_same_step(digits_cache, tmp_path):
    """accelerate launch, two gloo processes: SIGTERM to one worker; both finish the step, write
    their part of one checkpoint and stop (the launcher reports its workers' status 75 as a
    failure); the same command then finishes on the same weights on both ranks."""
    config = reliability_config(tmp_path)
    out = tmp_path / "run"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29531", "-m", "train", str(config), f"output_dir={out}",
              f"model.cache_dir={digits_cache}", *OVERRIDES, *_adversarial(8)]
    env = dict(subprocess_env(), ACCELERATE_USE_CPU="1")
    log = tmp_path / "launch.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(launch, cwd=ROOT, env=env, stdout=sink, stderr=sink, start_new_session=True)
    try:
        _wait_for_step(proc, out, 6)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[-1], signal.SIGTERM)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text()
    stops = [x for x in text.splitlines() if "stopped: on " in x]
    assert len(stops) == 2, text[-4000:]  # one line per rank, the same step
    ((step, ckpt),) = complete_checkpoints(out / PHASE)
    assert all(f"at 2step/0_adv_conditional step {step} of 8" in x for x in stops), stops
    assert "SIGTERM" in "".join(stops) and "a signal to another rank" in "".join(stops)
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert manifest_problems(ckpt) == []

    result = subprocess.run(launch, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"resumed 2step/0_adv_conditional at step {step}" in result.stderr
    ends = [r for r in read_metrics(out) if r.get("event") == "phase_end"]
    assert len(ends) == 3 and all(r["rank_weight_checksums"][0] == r["rank_weight_checksums"][1] for r in ends)
