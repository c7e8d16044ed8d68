"""train/stop.py in a real subprocess (signals to a real process): the first signal of each
kind sets the request, a repeat within the window is the same request, a later one kills at
once; the handlers are restored afterwards; DataLoader workers ignore the stop signals. And
the step's reduction carries the stop flag (train/steps.py `Updater`)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import subprocess_env

from train.steps import Updater
from train.stop import (
    REPEAT_WINDOW_S,
    STOP_SIGNALS,
    StopRequest,
    ignore_stop_signals,
    stop_on_signals,
)

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import os, signal, sys, time
from train.stop import stop_on_signals, REPEAT_WINDOW_S
signum = getattr(signal, sys.argv[1])
with stop_on_signals() as stop:
    os.kill(os.getpid(), signum)
    print("requested", stop.requested, stop.signal_name, flush=True)
    os.kill(os.getpid(), signum)  # the same request delivered twice (launcher + group)
    print("still running", flush=True)
    time.sleep(REPEAT_WINDOW_S + 0.2)
    os.kill(os.getpid(), signum)  # a second request: at once
    time.sleep(5)
    print("not reached", flush=True)
"""


@pytest.mark.parametrize("name", [s.name for s in STOP_SIGNALS])
def test_first_signal_requests_a_stop_a_repeat_is_ignored_a_second_kills(name):
    result = subprocess.run([sys.executable, "-c", SCRIPT, name], cwd=ROOT, env=subprocess_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines() == [f"requested True {name}", "still running"]
    assert f"{name} received: finishing the current step" in result.stderr
    assert f"{name} received again: stopping at once, without a checkpoint" in result.stderr
    assert result.returncode == -getattr(signal, name)  # killed by it: the default action


def test_handlers_are_restored_and_workers_ignore_stop_signals():
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    with stop_on_signals() as stop:
        assert all(signal.getsignal(s) == stop.handle for s in STOP_SIGNALS)
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(s) == signal.SIG_IGN for s in STOP_SIGNALS)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    assert REPEAT_WINDOW_S <= 1.0  # a user's second Ctrl-C, a second later, must be honoured


def test_the_step_reduction_carries_the_stop_flag():
    accelerator = Accelerator(cpu=True)
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    request = StopRequest()
    update = Updater(accelerator, 1.0, request)
    ok, _ = update((weight ** 2).sum(), optimizer, [weight])
    assert ok and not update.stop_agreed
    request.handle(signal.SIGTERM)
    ok, _ = update((weight ** 2).sum(), optimizer, [weight])
    assert ok and update.stop_agreed  # the step itself still applies
    ok, _ = update((weight * float("nan")).sum(), optimizer, [weight])
    assert not ok and update.stop_agreed and bool(torch.isfinite(weight).all())
