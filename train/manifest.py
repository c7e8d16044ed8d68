"""Trusting what is on disk: manifests of file sizes and hashes, and finite weights.

A folder is published complete (train/files.py), but a complete folder can still be damaged
afterwards: truncated by a full disk or a bad copy, garbled by bit rot, a file deleted by hand
(ARCHITECTURE.md pitfall 12). So every folder a later run trusts (a checkpoint, a phase or
stage final) holds `manifest.json`, written after every other file and before the folder is
renamed into place: each file's size and xxh3-128 hash. The export folder keeps one too,
updated file by file (`update_manifest`). Loading verifies first (`manifest_problems`,
`file_problem`); the callers decide what a failure means (set a checkpoint aside and fall back,
rebuild a final, refuse an export).

xxh3-128 (the xxhash package, already a dependency of wandb) hashes at memory speed (~15 GB/s
on one core, sha256 ~1.2 GB/s): verifying a 30 GB SDXL checkpoint costs the time to read it.
It detects damage, not tampering. Hashes are cached per process by (inode, size, mtime), so a
stage final hard-linked to its phase final is read once.

Weights must also be finite: a final or an export with a NaN or Inf is refused when written
and when read (`nonfinite_names`, `safetensors_problem`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import xxhash
from safetensors import SafetensorError, safe_open

MANIFEST_FILE = "manifest.json"
HASH_NAME = "xxh3_128"
FORMAT = "lightning-distill manifest v1"
_CHUNK_BYTES = 8 << 20
_hash_cache: dict[tuple, str] = {}


def file_hash(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _hash_cache:
        digest = xxhash.xxh3_128()
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                digest.update(chunk)
        _hash_cache[key] = digest.hexdigest()
    return _hash_cache[key]


def _entry(path: Path) -> dict:
    return {"size": path.stat().st_size, HASH_NAME: file_hash(path)}


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE)


def _write(folder: Path, entries: Mapping[str, dict]) -> Path:
    """manifest.json via a temporary sibling and a rename: never torn."""
    path = folder / MANIFEST_FILE
    tmp = folder / f".{MANIFEST_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"format": FORMAT, "hash": HASH_NAME, "files": dict(sorted(entries.items()))},
                              indent=1) + "\n")
    os.replace(tmp, path)
    return path


def write_manifest(folder: Path) -> Path:
    """Record every file under `folder` (recursively); call after the last other file is written."""
    folder = Path(folder)
    return _write(folder, {p.relative_to(folder).as_posix(): _entry(p) for p in _files(folder)})


def read_manifest(folder: Path) -> dict[str, dict] | None:
    """The recorded files, or None when there is no readable manifest."""
    try:
        data = json.loads((Path(folder) / MANIFEST_FILE).read_text())
        files = data["files"]
        if data.get("hash") != HASH_NAME or not isinstance(files, dict):
            return None
        return files
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _entry_problem(path: Path, expected: dict) -> str | None:
    if not path.is_file():
        return f"{path.name}: missing"
    size = path.stat().st_size
    if size != expected.get("size"):
        return f"{path.name}: {size} bytes, the manifest says {expected.get('size')}"
    if file_hash(path) != expected.get(HASH_NAME):
        return f"{path.name}: contents differ from the manifest's hash (garbled)"
    return None


def manifest_problems(folder: Path) -> list[str]:
    """What is wrong with `folder` against its manifest ([] = intact). A folder without a
    readable manifest is not trusted: every writer of this version records one."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder.name}: missing"]
    files = read_manifest(folder)
    if files is None:
        state = "unreadable" if (folder / MANIFEST_FILE).exists() else "missing"
        return [f"{MANIFEST_FILE}: {state}"]
    return [p for name, entry in files.items() if (p := _entry_problem(folder / name, entry))]


def update_manifest(folder: Path, add: Iterable[Path] = (), drop: Iterable[Path] = ()) -> Path:
    """For a folder written file by file (export/): record (or re-record) `add`, forget `drop`
    and entries of files that are gone. A writer drops a file's entry before replacing it and
    adds it after, so a crash in between leaves the file unlisted, never listed with a stale
    hash."""
    folder = Path(folder)

    def name(path) -> str:
        return Path(path).resolve().relative_to(folder.resolve()).as_posix()

    dropped = {name(p) for p in drop}
    files = {n: entry for n, entry in (read_manifest(folder) or {}).items()
             if (folder / n).is_file() and n not in dropped}
    for path in add:
        files[name(path)] = _entry(Path(path))
    return _write(folder, files)


def file_problem(path: Path) -> str | None:
    """What is wrong with one file against its folder's manifest; None when intact or when the
    folder's manifest does not list it (a file copied elsewhere)."""
    path = Path(path)
    entry = (read_manifest(path.parent) or {}).get(path.name)
    if entry is None:
        return None if path.is_file() else f"{path.name}: missing"
    return _entry_problem(path, entry)


# ----------------------------------------------------------------------------- finite weights


def nonfinite_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an Inf."""
    return [name for name, t in tensors.items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def describe_nonfinite(names: list[str]) -> str:
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return f"non-finite weights (NaN or Inf) in {len(names)} tensor(s): {shown}"


_checked_cache: dict[tuple, str | None] = {}


def safetensors_problem(path: Path) -> str | None:
    """Whether a .safetensors file parses and holds only finite tensors (read one at a time;
    cached per process like the hashes)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _checked_cache:
        _checked_cache[key] = _safetensors_problem(path)
    return _checked_cache[key]


def _safetensors_problem(path: Path) -> str | None:
    bad = []
    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys())  # noqa: SIM118 (safe_open is no mapping)
        for name in names:
            # One mapping per tensor: a file mapped once for the whole loop stays resident as
            # it is read (10 GB for an SDXL UNet in fp32); unmapped after each tensor, it does not.
            with safe_open(str(path), framework="pt") as f:
                tensor = f.get_tensor(name)
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                bad.append(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        return f"{path.name}: not a readable safetensors file ({str(err).splitlines()[0][:120]})"
    return f"{path.name}: {describe_nonfinite(bad)}" if bad else None
