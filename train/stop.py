"""Graceful stops: SIGTERM, SIGINT and SIGUSR1 end a run with a complete checkpoint.

Schedulers send SIGTERM before a preemption, SLURM sends SIGUSR1 (with `--signal=USR1@SECONDS`)
before a time limit, a user presses Ctrl-C (SIGINT). Any of them sets a flag (`StopRequest`)
and logs one line; the loop finishes the optimizer step in progress, every rank writes the
checkpoint of that step, and the run ends with `Stopped` (one line, exit status 75,
train/errors.py). The same command resumes it, losing nothing but the step the signal
interrupted (and not even that: it is finished first).

Under accelerate every rank must stop after the same step, or one rank waits forever at the
checkpoint's barrier. The flag is agreed on in the step's existing host synchronisation: the
non-finite guard already reduces a tensor over the ranks to decide whether to apply the step
(`train.steps.Updater`), and it reduces the local stop flag alongside (one collective, not
two). Between phases, where no step runs, `train.ranks.any_rank` agrees on it with a
collective of its own.

A second signal stops at once: the process is killed by it, no checkpoint (the last complete
one stays; the staging folder of an interrupted write is removed on the next start). A signal
arriving within `REPEAT_WINDOW_S` of the first counts as the same request: a launcher such as
torchrun forwards the SIGTERM or SIGINT its workers already got from the scheduler or the
terminal (the whole process group), so each worker sees it twice within milliseconds.

DataLoader workers ignore these signals (`ignore_stop_signals`, their worker_init_fn): a worker
exits silently on SIGINT, and the training process would then fail on the next batch with
"DataLoader worker exited unexpectedly". The training process owns the stop and shuts the
workers down when it ends.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
REPEAT_WINDOW_S = 1.0  # a repeat within this many seconds is the same request, not a second one


class StopRequest:
    """Whether this process was asked to stop, and by which signal."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._first_at = 0.0

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def handle(self, signum: int, frame=None) -> None:
        """The signal handler (runs in the main thread between bytecodes)."""
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name, self._first_at = name, time.monotonic()
            log.warning("%s received: finishing the current step, then writing a checkpoint and "
                        "stopping (send it again to stop at once, without a checkpoint)", name)
            return
        if time.monotonic() - self._first_at < REPEAT_WINDOW_S:
            return  # the same request delivered twice (launcher + process group)
        os.write(2, f"{name} received again: stopping at once, without a checkpoint\n".encode())
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Install the handlers for the duration of a run; restore the previous ones after.
    Outside the main thread (where Python cannot install handlers) the request never fires."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = {s: signal.signal(s, request.handle) for s in STOP_SIGNALS}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """DataLoader worker_init_fn: leave the stop signals to the training process."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)

