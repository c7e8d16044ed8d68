"""User errors: what is wrong, where, and what to do, printed on one line by every CLI.

Code that finds a problem the user can fix (config, paths, base-model layout, data, damaged
files, a full disk, a second run on one directory) raises a `UserError` right there, with its
three parts. Each command-line entry point runs its `main` through `run_cli`, the one place
that formats them:

    error: <what> (<where>): <what to do>

and exits with status 2. The traceback is printed as well under `--debug` (every CLI has the
flag, `add_debug_flag`) or LIGHTNING_DEBUG=1. Any other exception is a bug: it keeps Python's
traceback and exit status 1.

A run stopped by a signal (SIGTERM, SIGINT, SIGUSR1: train/stop.py) is not an error but ends
the same way, one line and its own status: `stopped: <what> (<where>): <what to do>`, exit
status 75 (`STOPPED_STATUS`, sysexits' EX_TEMPFAIL: "try again later", which is what a
scheduler's requeue logic should do with it).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable

DEBUG_ENV = "LIGHTNING_DEBUG"
USER_ERROR_STATUS = 2
STOPPED_STATUS = 75  # EX_TEMPFAIL: stopped on request with a complete checkpoint; run again to resume


class OneLineExit(Exception):
    """Ends a CLI with one line `<label>: <what> (<where>): <what to do>` and `status`.
    `str()` is the line without the label."""

    label = "error"
    status = USER_ERROR_STATUS

    def __init__(self, what: str, where: object = "", todo: str = ""):
        super().__init__(what, where, todo)  # args round-trip through pickle (DataLoader workers)
        self.what, self.where, self.todo = what, str(where), todo

    def __str__(self) -> str:
        text = self.what
        if self.where:
            text += f" ({self.where})"
        if self.todo:
            text += f": {self.todo}"
        return text


class UserError(OneLineExit):
    """A problem the user can fix (exit status 2)."""


class Stopped(OneLineExit):
    """The run stopped on a signal after a complete checkpoint (train/stop.py); not an error."""

    label = "stopped"
    status = STOPPED_STATUS


class DamagedFile(UserError):
    """A file on disk that fails its manifest, cannot be parsed, or holds non-finite weights."""


class DataError(UserError):
    """Training data that yields no usable sample."""


class DiskFull(UserError):
    """A write that ran out of space; what was published before it is intact."""


class RunLocked(UserError):
    """Another live process is training into the same output_dir."""


class Diverged(UserError):
    """Too many non-finite steps in a row (ARCHITECTURE.md pitfall 10)."""


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class _DebugAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        # The environment, not the namespace: the runner reads it, and subprocesses (sweep
        # runs) inherit it.
        os.environ[DEBUG_ENV] = "1"
        setattr(namespace, self.dest, True)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action=_DebugAction, nargs=0, default=False,
                        help=f"print the traceback of user errors too (or set {DEBUG_ENV}=1)")


def report(err: OneLineExit) -> int:
    """Print a user error (or a stop) on one line (and its traceback in debug mode); the exit
    status."""
    if debug_enabled():
        traceback.print_exception(err)
    print(f"{err.label}: {err}", file=sys.stderr, flush=True)
    return err.status


def run_cli(main: Callable[[], object]) -> int:
    """Run a CLI's `main()`; a UserError becomes one line on stderr and exit status 2, a stop
    on a signal one line and status 75.

    An int returned by `main` is the exit status, anything else means 0."""
    try:
        status = main()
    except OneLineExit as err:
        return report(err)
    return status if isinstance(status, int) else 0
