"""Helpers of the fault-injection suite: a reference run, runs killed at chosen moments, files
damaged the ways disks and copies damage them, and the comparison of two runs' exports.

Every run is a real `python -m train` subprocess on the tiny digits model with a two-stage
recipe (an MSE stage, then adversarial LoRA → merge → full), a checkpoint every step and two
kept, so kills land in steps, checkpoint writes, finals and exports alike.

"Bitwise equal" exports: every tensor of every export .safetensors file has the same dtype,
shape and bytes, and the metadata are equal as parsed dicts. (Two writes of the same tensors
can order the JSON header differently, so the files' bytes are not compared; the resolved
config in the metadata is compared without its output_dir, the only key that differs.)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from conftest import subprocess_env, write_short_config
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = ("checkpoint.every_steps=1", "checkpoint.keep_last=2")
ADVERSARIAL_STEPS = 4
DONE = "reference.json"


def reliability_config(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return write_short_config(directory, adversarial_steps=ADVERSARIAL_STEPS)


def train_cmd(config: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "train", str(config), f"output_dir={out}", f"model.cache_dir={cache}",
            *OVERRIDES, *extra]


def run_train(config: Path, out: Path, cache: Path, *extra: str, timeout: int = 900
              ) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(config, out, cache, *extra), cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_train(config: Path, out: Path, cache: Path, *extra: str, log: Path | None = None) -> subprocess.Popen:
    sink = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(train_cmd(config, out, cache, *extra), cwd=ROOT, env=subprocess_env(),
                            stdout=sink, stderr=sink, start_new_session=True)


def kill9(proc: subprocess.Popen) -> None:
    """SIGKILL the run and everything it started (DataLoader workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def one_line_error(stderr: str) -> str:
    """The `error: ...` line of a failed CLI, asserting it is the whole story (no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- the reference run


@dataclass(frozen=True)
class Reference:
    config: Path
    run: Path  # a finished, uninterrupted run
    seconds: float  # its wall time, start to exit
    total_steps: int  # optimizer steps over the whole recipe (the last global step logged)
    cache: Path


def reference_run(digits_cache: Path, tmp_path_factory) -> Reference:
    """The uninterrupted run every trial is compared with; built once per pytest session and
    shared by the suite's modules through the session's base temp folder."""
    root = tmp_path_factory.getbasetemp() / "reliability_reference"
    done = root / DONE
    if not done.is_file():
        shutil.rmtree(root, ignore_errors=True)
        config = reliability_config(root)
        start = time.time()
        result = run_train(config, root / "run", digits_cache)
        assert result.returncode == 0, result.stderr[-4000:]
        done.write_text(json.dumps({"seconds": time.time() - start,
                                    "total_steps": _logged_step(root / "run" / "metrics.jsonl", 0)}))
    info = json.loads(done.read_text())
    return Reference(root / "short.yaml", root / "run", info["seconds"], info["total_steps"], digits_cache)


def copy_run(run: Path, to: Path) -> Path:
    """A copy of a run directory (hard links kept as links, like the original's finals)."""
    shutil.copytree(run, to, symlinks=True, copy_function=_link_aware_copy())
    return to


def _link_aware_copy():
    seen: dict[tuple[int, int], str] = {}

    def copy(src, dst):
        stat = os.stat(src)
        key = (stat.st_dev, stat.st_ino)
        if stat.st_nlink > 1 and key in seen:
            os.link(seen[key], dst)
        else:
            shutil.copy2(src, dst)
            seen[key] = dst
        return dst

    return copy


# ----------------------------------------------------------------------------- comparing runs


def _metadata(meta: dict[str, str]) -> dict:
    parsed = {}
    for key, value in meta.items():
        try:
            parsed[key] = json.loads(value)
        except ValueError:
            parsed[key] = value
    if isinstance(parsed.get("config"), dict):
        parsed["config"].pop("output_dir", None)
    return parsed


def safetensors_differences(a: Path, b: Path) -> list[str]:
    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        if _metadata(fa.metadata() or {}) != _metadata(fb.metadata() or {}):
            return [f"{a.name}: metadata differ"]
        if set(fa.keys()) != set(fb.keys()):
            return [f"{a.name}: tensor names differ"]
        out = []
        for key in fa.keys():  # noqa: SIM118
            ta, tb = fa.get_tensor(key), fb.get_tensor(key)
            if ta.dtype != tb.dtype or ta.shape != tb.shape or not torch.equal(_bytes(ta), _bytes(tb)):
                out.append(f"{a.name}: {key} differs")
        return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes (NaN == NaN, -0.0 != 0.0: bitwise, not numeric, equality)."""
    return t.contiguous().flatten().view(torch.uint8)


def export_differences(reference: Path, run: Path) -> list[str]:
    """[] when the two runs' exports are bitwise equal (see the module docstring)."""
    ref = {p.name: p for p in (reference / "export").glob("*.safetensors")}
    got = {p.name: p for p in (run / "export").glob("*.safetensors")}
    if ref.keys() != got.keys():
        return [f"export files differ: {sorted(ref.keys() ^ got.keys())}"]
    out = []
    for name in sorted(ref):
        out += safetensors_differences(ref[name], got[name])
    for report in sorted((reference / "export").glob("*_lora_report.json")):
        if json.loads(report.read_text()) != json.loads((run / "export" / report.name).read_text()):
            out.append(f"{report.name} differs")
    return out


# ----------------------------------------------------------------------------- damaging files


def truncate(path: Path) -> None:
    """A torn copy: the first half, written in place (hard links see it too)."""
    data = path.read_bytes()
    with path.open("r+b") as f:
        f.truncate(len(data) // 2)


def empty(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(0)


def garble(path: Path, seed: int = 0, nbytes: int = 64) -> None:
    """Bit rot: random bytes over a stretch inside the tensor data, same size, in place."""
    size = path.stat().st_size
    rng = random.Random(seed)
    offset = rng.randrange(size // 2, size - nbytes)
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(bytes(rng.randrange(256) for _ in range(nbytes)))


def garble_header(path: Path) -> None:
    """A garbled safetensors JSON header (its first bytes after the length)."""
    with path.open("r+b") as f:
        f.seek(8)
        f.write(b"\x00\xff" * 8)


# ----------------------------------------------------------------------------- kill moments


STAGING_MARKS = (".tmp",)


def staging_paths(run: Path) -> dict[str, tuple[int, int]]:
    """What is being written: staging folders and files (train/files.py), with their inode
    and mtime (a leftover of an earlier kill is not a write in progress)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(run):
        for name in dirnames + filenames:
            if name.endswith(STAGING_MARKS):
                path = os.path.join(dirpath, name)
                try:
                    stat = os.stat(path)
                except OSError:
                    continue
                found[os.path.relpath(path, run)] = (stat.st_ino, stat.st_mtime_ns)
    return found


def _new_writes(run: Path, before: dict) -> list[str]:
    return [p for p, key in staging_paths(run).items() if before.get(p) != key]


@dataclass(frozen=True)
class Moment:
    """When to kill: once this run has logged global step `after_step` (so moments fall in the
    work, whatever the machine's speed), then either `delay_s` later ("time") or as soon as
    something is being written ("write": a checkpoint, final, export or manifest)."""

    kind: str  # "time" | "write"
    after_step: int
    delay_s: float = 0.0
    patience_s: float = 10.0


def seeded_moments(seed: int, count: int, total_steps: int) -> list[Moment]:
    """`count` moments at distinct, increasing global steps in 1..total_steps (the last step is
    followed by the last stage's final and exports), each of a random kind."""
    rng = random.Random(seed)
    steps = sorted(rng.sample(range(1, total_steps + 1), count))
    return [Moment(rng.choice(("time", "write")), step, rng.uniform(0.0, 1.5)) for step in steps]


def _logged_step(metrics: Path, offset: int) -> int:
    """The highest global step this run has logged (rows after `offset`)."""
    try:
        with metrics.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return -1
    best = -1
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step_ok" in row:
            best = max(best, int(row["global_step"]))
    return best


def start_and_kill(config: Path, out: Path, cache: Path, moment: Moment, log: Path | None = None) -> str:
    """Start the run, kill it at `moment`; returns what it was doing (for the test's report)."""
    metrics = out / "metrics.jsonl"
    offset = metrics.stat().st_size if metrics.is_file() else 0
    proc = start_train(config, out, cache, log=log)
    while proc.poll() is None and _logged_step(metrics, offset) < moment.after_step:
        time.sleep(0.005)
    leftovers, start = staging_paths(out), time.time()
    if moment.kind == "time":
        while proc.poll() is None and time.time() - start < moment.delay_s:
            time.sleep(0.005)
    else:
        while proc.poll() is None and time.time() - start < moment.patience_s and not _new_writes(out, leftovers):
            time.sleep(0.002)
    writing = _new_writes(out, leftovers)
    if proc.poll() is not None:
        return "finished before the kill"
    kill9(proc)
    return (f"killed {time.time() - start:.2f}s after step {moment.after_step} in {_newest_phase(out)}"
            + (f" writing {writing}" if writing else ""))


def _newest_phase(run: Path) -> str:
    """The folder of the newest file under stages/ or export/ (where the run was)."""
    newest, when = "start-up", 0.0
    for top in ("stages", "export"):
        for dirpath, _, filenames in os.walk(run / top):
            for name in filenames:
                try:
                    mtime = os.stat(os.path.join(dirpath, name)).st_mtime
                except OSError:
                    continue
                if mtime > when:
                    newest, when = os.path.relpath(dirpath, run), mtime
    return newest
