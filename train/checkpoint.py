"""Resumable checkpoints inside a phase: `stages/<stage>/<phase>/checkpoint-<step>/`.

accelerate's `save_state` runs on EVERY process (pitfall 1: calling it on the main process only
deadlocks under FSDP/DeepSpeed) into `checkpoint-<step>.tmp`; after a barrier the main process
writes `counters.json` last and renames the folder, so a folder named `checkpoint-<step>` is
complete by construction and resuming never picks up a torn one. Data position and all
randomness derive from the counters (seeded by (seed, rank, step)), so the counters plus
accelerate's state (models, optimizers) and the phase's extra tensors (the EMA shadow, in
`extra_state.safetensors`) are the whole state of a run. The EMA is not registered with
accelerate: its registrations outlive a phase, and a later phase's resume then finds more
custom objects saved than registered.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import Tensor

from train.files import publish, staging_path

COUNTERS_FILE = "counters.json"
EXTRA_FILE = "extra_state.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class Counters:
    phase: int  # index into the expanded recipe
    step: int  # optimizer steps done inside the phase
    nonfinite_in_row: int  # consecutive skipped steps (pitfall 10)
    skipped_total: int  # all skipped steps in the phase


def complete_checkpoints(phase_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a phase, oldest first."""
    if not phase_dir.is_dir():
        return []
    found = []
    for child in phase_dir.iterdir():
        match = _NAME.match(child.name)
        if match and (child / COUNTERS_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(phase_dir: Path) -> Path | None:
    found = complete_checkpoints(phase_dir)
    return found[-1][1] if found else None


def save_checkpoint(accelerator: Accelerator, phase_dir: Path, counters: Counters, keep_last: int,
                    extra: Mapping[str, Tensor] | None = None) -> Path:
    """Save accelerate state on every process, then publish atomically and prune old ones.

    extra: tensors identical on every rank (the EMA shadow), written by the main process."""
    final = phase_dir / f"checkpoint-{counters.step}"
    tmp = staging_path(final)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if extra:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, tmp / EXTRA_FILE)
        (tmp / COUNTERS_FILE).write_text(json.dumps(asdict(counters), indent=2))
        publish(tmp, final)
        for _, old in complete_checkpoints(phase_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path) -> Counters:
    accelerator.load_state(str(path))
    return Counters(**json.loads((path / COUNTERS_FILE).read_text()))


def read_extra_state(path: Path) -> dict[str, Tensor]:
    """The checkpoint's extra tensors ({} when it has none)."""
    return load_file(path / EXTRA_FILE) if (path / EXTRA_FILE).is_file() else {}


def remove_checkpoints(phase_dir: Path) -> None:
    """After a phase's final is written its resumable checkpoints are no longer needed."""
    for _, path in complete_checkpoints(phase_dir):
        shutil.rmtree(path, ignore_errors=True)
    for tmp in phase_dir.glob("checkpoint-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
