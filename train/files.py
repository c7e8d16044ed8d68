"""Writing files so that a crash never leaves a torn one, and the cache they are built into.

Every file or folder the framework publishes (checkpoints, phase and stage finals, exports,
cached embedded models and shards, the evaluator's classifier) is written under a temporary
sibling name and renamed into place when complete: a path that exists is complete by
construction (ARCHITECTURE.md pitfall 1). A published folder records its manifest last, just
before the rename (`publish`), so a later reader can tell it is still intact (pitfall 12).
This module is the one definition of that pattern.

Two more things that happen to files on disk live here: a write that runs out of space
becomes a `DiskFull` error naming the folder (`disk_full_guard`; the staging copy is removed
and what was published before is intact), and a published folder found damaged later is set
aside under `<name>.corrupt` (`set_aside`), never deleted.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from train.errors import DiskFull, OneLineExit, UserError
from train.manifest import write_manifest

TMP_SUFFIX = ".tmp"
CORRUPT_SUFFIX = ".corrupt"
# Below this much free space a failed write is taken for a full disk: torch.save reports one
# as "unexpected pos ..." with no errno (checked on a full tmpfs).
NEARLY_FULL_BYTES = 16 << 20
log = logging.getLogger("train")


def _free_bytes(path: Path) -> int | None:
    for candidate in (Path(path), *Path(path).parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def is_disk_full(exc: BaseException, where: Path) -> bool:
    """Whether `exc`, raised while writing under `where`, means the disk (or quota) is full."""
    seen, visited = exc, set()
    while seen is not None and id(seen) not in visited:
        visited.add(id(seen))
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "os error 28" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    free = _free_bytes(where)
    return free is not None and free < NEARLY_FULL_BYTES


@contextmanager
def disk_full_guard(where: Path) -> Iterator[None]:
    """Turn an out-of-space failure of the writes inside into `DiskFull` naming `where`."""
    try:
        yield
    except OneLineExit:  # a user error or a stop is what it says, whatever the free space
        raise
    except Exception as exc:
        if is_disk_full(exc, where):
            raise DiskFull("no space left on device", f"writing {where}",
                           "free some space and re-run the same command: it resumes from the "
                           "last complete checkpoint, which is intact") from exc
        raise


def make_output_dir(path: Path, key: str, todo: str) -> Path:
    """Create a folder to write into (and check that it takes a file), or raise a UserError
    saying why not: a file in the way, a parent that is a file, /proc, no permission."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        reason = err.strerror or type(err).__name__
        if isinstance(err, (FileExistsError, NotADirectoryError)):
            reason = "a file is in the way" if path.exists() else "a parent is a file, not a folder"
        raise UserError(f"{key} cannot be used as a folder: {reason}", path, todo) from err
    return path


def set_aside(path: Path) -> Path:
    """Rename a damaged file or folder to `<name>.corrupt` (`.corrupt-2`, ... if taken), so it
    is neither trusted nor lost; returns the new path."""
    path = Path(path)
    for n in range(1, 1000):
        target = path.with_name(path.name + CORRUPT_SUFFIX + (f"-{n}" if n > 1 else ""))
        if not target.exists():
            os.rename(path, target)
            log.warning("set aside %s as %s (kept, never deleted: remove it when no longer needed)",
                        path, target.name)
            return target
    raise FileExistsError(f"{path}: too many {CORRUPT_SUFFIX} copies already")


def remove_orphans(root: Path, keep: tuple[str, ...] = ("wandb",)) -> list[Path]:
    """Remove the staging files and folders (`*.tmp`) that interrupted writes left under `root`
    (a kill -9, a second signal, a power cut in the middle of a checkpoint, final, export or
    manifest); returns what was removed. Only for a run directory whose lock this process
    holds (train/lock.py): then no write is in progress there. Top-level folders in `keep`
    (wandb's own) are not walked."""
    root, removed = Path(root), []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == root:
            dirnames[:] = [d for d in dirnames if d not in keep]
        for name in [d for d in dirnames if d.endswith(TMP_SUFFIX)]:
            shutil.rmtree(here / name, ignore_errors=True)
            dirnames.remove(name)
            removed.append(here / name)
        for name in filenames:
            if name.endswith(TMP_SUFFIX):
                (here / name).unlink(missing_ok=True)
                removed.append(here / name)
    if removed:
        shown = ", ".join(str(p.relative_to(root)) for p in removed[:3])
        log.warning("removed %d leftover staging file(s) of interrupted writes: %s%s", len(removed),
                    shown, " ..." if len(removed) > 3 else "")
    return removed


def staging_path(final: Path) -> Path:
    """The staging folder of `final`: `<name>.tmp`, the same name on every rank, so all
    ranks of a run write one checkpoint into one folder."""
    final = Path(final)
    return final.with_name(final.name + TMP_SUFFIX)


def publish(tmp: Path, final: Path) -> None:
    """Record the complete `tmp`'s manifest (its files' sizes and hashes, train/manifest.py),
    then rename it onto `final`, replacing whatever was there."""
    final = Path(final)
    write_manifest(Path(tmp))
    if final.is_dir():
        shutil.rmtree(final)
    os.replace(tmp, final)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on a clean exit it becomes `final` (replacing it)."""
    final = Path(final)
    tmp = staging_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with disk_full_guard(final.parent):
            tmp.mkdir(parents=True)
            yield tmp
            publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a staging file path; on a clean exit the file written there becomes `final`.

    The staging name is unique per call, so two processes writing the same file (two runs
    building one cached classifier) never write into each other's staging file.
    """
    final = Path(final)
    with disk_full_guard(final.parent):
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=TMP_SUFFIX, dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        with disk_full_guard(final.parent):
            yield tmp
            os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def build_once(final: Path, marker: str, build: Callable[[Path], object]) -> Path:
    """`final`, built by `build(tmp_dir)` unless `final/marker` exists.

    The staging folder is unique per process (not `staging_path`): concurrent builders (the
    ranks of one run, or two runs sharing a cache) each build their own copy, the first
    rename wins, and the others keep it.
    """
    final = Path(final)
    if (final / marker).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first; keep its copy
            if not (final / marker).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def default_cache_root() -> Path:
    """Where built embedded models live: $DISTILL_CACHE, else ~/.cache/lightning-distill."""
    env = os.environ.get("DISTILL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lightning-distill"
