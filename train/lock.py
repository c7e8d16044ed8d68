"""One run per output_dir: the run directory is created and locked before anything is written.

`output_dir/run.lock` holds the PID, host and start time of the run training there, under an
exclusive `flock` taken by the main process for the whole run. A second run started on the
same directory is refused, naming that PID and host. The kernel (or the NFS server, after its
lease) drops the lock when its process dies, however it dies, so a crashed run's lock file
never blocks the next one: the file stays, only the lock matters. The file is never
unlinked: removing it would let a third process lock a new file while a second still
waits on the old one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator

from train.errors import RunLocked
from train.files import make_output_dir
from train.ranks import main_process_check

log = logging.getLogger("train")


@dataclass
class RunLock:
    path: Path
    fd: int
    exclusive: bool = True  # False where the filesystem cannot lock: another run may be writing

    @classmethod
    def acquire(cls, path: Path) -> RunLock:
        path = Path(path)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        exclusive = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(path)
            os.close(fd)
            raise RunLocked(
                "another run is training into this output_dir",
                f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
                f"started {holder.get('started', '?')}; lock file {path}",
                "wait for it to finish or stop it, or choose another output_dir") from None
        except OSError as err:  # a filesystem without locks: go on, but say so
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            log.warning("%s: the filesystem cannot lock files (%s); make sure no other run "
                        "uses this output_dir", path, err.strerror)
            exclusive = False
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return cls(path, fd, exclusive)

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = -1


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def claim_run_dir(root: Path, lock_file: Path, accelerator: Accelerator) -> RunLock | None:
    """The main process creates and locks the run directory; every rank raises its error, so a
    refused multi-process launch ends on all ranks instead of hanging at the next barrier."""

    def claim() -> RunLock:
        make_output_dir(root, "output_dir", "set output_dir to a writable folder (e.g. output_dir=runs/NAME)")
        return RunLock.acquire(lock_file)

    return main_process_check(accelerator, claim)
