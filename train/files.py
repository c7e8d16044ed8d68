"""Writing files so that a crash never leaves a torn one, and the cache they are built into.

Every file or folder the framework publishes (checkpoints, phase and stage finals, exports,
cached embedded models and shards, the evaluator's classifier) is written under a temporary
sibling name and renamed into place when complete: a path that exists is complete by
construction (ARCHITECTURE.md pitfall 1). This module is the one definition of that pattern.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".tmp"


def staging_path(final: Path) -> Path:
    """The staging folder of `final`: `<name>.tmp`, the same name on every rank, so all
    ranks of a run write one checkpoint into one folder."""
    final = Path(final)
    return final.with_name(final.name + TMP_SUFFIX)


def publish(tmp: Path, final: Path) -> None:
    """Rename the complete `tmp` onto `final`, replacing whatever was there."""
    final = Path(final)
    if final.is_dir():
        shutil.rmtree(final)
    os.replace(tmp, final)


@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on a clean exit it becomes `final` (replacing it)."""
    tmp = staging_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
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
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=TMP_SUFFIX, dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
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
