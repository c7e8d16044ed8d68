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

Complete is not the same as intact (pitfall 12): `publish` records a manifest of every file's
size and hash, and `intact_checkpoint` verifies the newest checkpoint against it before a
resume trusts it. A damaged one (truncated, emptied, garbled, a file missing) is set aside as
`checkpoint-<step>.corrupt` with a warning, and the next newest is tried; when none is left
the phase starts over, and the warning says how many steps that costs. A save that runs out
of space removes its staging folder and raises `DiskFull`; older checkpoints are pruned only
after the new one is published, so the last complete one stays intact.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import SAFE_MODEL_NAME
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from train.errors import DamagedFile, UserError
from train.files import disk_full_guard, publish, set_aside, staging_path
from train.manifest import HASH_NAME, file_hash, manifest_problems

log = logging.getLogger("train")
COUNTERS_FILE = "counters.json"
FROZEN_FILE = "frozen.json"
EXTRA_FILE = "extra_state.safetensors"
_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class Counters:
    phase: int  # index into the expanded recipe
    step: int  # optimizer steps done inside the phase
    nonfinite_in_row: int  # consecutive skipped steps (pitfall 10)
    skipped_total: int  # all skipped steps in the phase
    # The phase step at which the data stream in use was opened (train.data.training_stream):
    # a resume opens it there again and skips the batches up to `step`, so a checkpoint off
    # the every_steps schedule (a stop on a signal) resumes on the same data. None (counters
    # of an earlier version): `step`.
    stream_start: int | None = None


def complete_checkpoints(phase_dir: Path) -> list[tuple[int, Path]]:
    """Published checkpoints of a phase (complete by construction; not yet verified), oldest
    first. Staging (`.tmp`) and set-aside (`.corrupt`) folders are not among them."""
    if not phase_dir.is_dir():
        return []
    found = []
    for child in phase_dir.iterdir():
        match = _NAME.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(phase_dir: Path) -> Path | None:
    found = complete_checkpoints(phase_dir)
    return found[-1][1] if found else None


def intact_checkpoint(phase_dir: Path) -> Path | None:
    """The newest checkpoint that matches its manifest. Newer damaged ones are set aside with a
    warning naming the damaged file and the steps the fallback costs. Main process only; the
    other ranks then take `latest_checkpoint` after a barrier."""
    found = complete_checkpoints(phase_dir)
    newest = found[-1][0] if found else 0
    for step, path in reversed(found):
        problems = manifest_problems(path)
        if not problems:
            if step != newest:
                log.warning("resuming from %s instead: %d step(s) to redo", path, newest - step)
            return path
        log.warning("checkpoint %s is damaged (%s); trying the previous one", path, "; ".join(problems))
        set_aside(path)
    if found:
        log.warning("no intact checkpoint left in %s: the phase starts over (%d step(s) to redo)",
                    phase_dir, newest)
    return None


def save_checkpoint(accelerator: Accelerator, phase_dir: Path, counters: Counters, keep_last: int,
                    extra: Mapping[str, Tensor] | None = None, trainable: Iterable[Tensor] | None = None,
                    frozen: Mapping[str, object] | None = None) -> Path:
    """Save accelerate state on every process, then publish atomically and prune old ones.

    extra: tensors identical on every rank (the EMA shadow), written by the main process.
    trainable: the parameters that train; the models' files then hold only these (a LoRA
    phase's checkpoint is its adapter and discriminator heads, not the frozen UNet it sits on).
    frozen: what the frozen weights are rebuilt from on resume (`frozen_reference`), recorded
    in `frozen.json` and checked by `load_checkpoint`."""
    final = phase_dir / f"checkpoint-{counters.step}"
    tmp = staging_path(final)
    handle = None
    if trainable is not None:
        handle = accelerator.register_save_state_pre_hook(_keep_only(trainable))
    try:
        with disk_full_guard(phase_dir):
            if accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp), safe_serialization=True)
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                if extra:
                    save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, tmp / EXTRA_FILE)
                if frozen is not None:
                    (tmp / FROZEN_FILE).write_text(json.dumps(dict(frozen), indent=2))
                (tmp / COUNTERS_FILE).write_text(json.dumps(asdict(counters), indent=2))
                publish(tmp, final)  # manifest last, then the rename
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # give the space back; older ones are intact
        raise
    finally:
        if handle is not None:
            handle.remove()
    if accelerator.is_main_process:
        for _, old in complete_checkpoints(phase_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _keep_only(trainable: Iterable[Tensor]):
    """A save-state pre-hook that drops every tensor but the trainable parameters from the
    models' state dicts (under FSDP/DeepSpeed accelerate passes no state dicts: unchanged)."""
    ids = {id(p) for p in trainable}

    def hook(models, weights, output_dir) -> None:
        for model, state in zip(models, weights):
            keep = {name for name, p in model.named_parameters() if id(p) in ids}
            for key in [k for k in state if k not in keep]:
                del state[key]

    return hook


def frozen_reference(base_dir: Path, start: Path | None) -> dict[str, object]:
    """What a phase's frozen weights are rebuilt from: the base UNet's files (path, size and
    hash; only these are compared on resume) and the phase's start (a final, verified by its own
    manifest whenever it is loaded)."""
    from train.models import base_unet_files  # train.models imports this module's neighbours

    files = [{"name": f.name, "size": f.stat().st_size, HASH_NAME: file_hash(f)} for f in base_unet_files(base_dir)]
    return {"base_dir": str(Path(base_dir).resolve()), "base_unet": files,
            "start": str(start) if start is not None else None}


def load_checkpoint(accelerator: Accelerator, path: Path, trainable: Iterable[Tensor] | None = None,
                    frozen: Mapping[str, object] | None = None) -> Counters:
    """Load a checkpoint; with `trainable`, one that holds only the trainable parameters (the
    frozen ones were rebuilt, identically, from `frozen`, which must match what it recorded)."""
    if trainable is None:
        accelerator.load_state(str(path))
    else:
        _check_frozen(path, frozen)
        _check_holds(accelerator, path, trainable)
        accelerator.load_state(str(path), strict=False)
    return Counters(**json.loads((path / COUNTERS_FILE).read_text()))


def _check_frozen(path: Path, frozen: Mapping[str, object] | None) -> None:
    recorded = path / FROZEN_FILE
    if frozen is None or not recorded.is_file():
        return
    saved = json.loads(recorded.read_text())
    # The base's weights must be the same bytes; where the folder or the run now lies may move.
    if saved.get("base_unet") != json.loads(json.dumps(frozen["base_unet"])):
        raise UserError("the frozen weights this checkpoint was trained on changed (base model files "
                        "or the phase's start differ from those recorded in frozen.json)", path,
                        "resume with the same model.base, or remove the checkpoint to start the phase over")


def _check_holds(accelerator: Accelerator, path: Path, trainable: Iterable[Tensor]) -> None:
    """Every trainable parameter must be in the checkpoint (a partial load must not silently
    leave one at its fresh initialisation)."""
    ids = {id(p) for p in trainable}
    for i, model in enumerate(accelerator._models):
        file = path / (f"{SAFE_MODEL_NAME}.safetensors" if i == 0 else f"{SAFE_MODEL_NAME}_{i}.safetensors")
        if not file.is_file():
            continue  # FSDP/DeepSpeed layouts: accelerate checks its own files
        with safe_open(str(file), framework="pt") as f:
            held = set(f.keys())
        missing = [n for n, p in model.named_parameters() if id(p) in ids and n not in held]
        if missing:
            raise DamagedFile(f"checkpoint lacks {len(missing)} trainable tensor(s), e.g. {missing[0]}",
                              file, "it is set aside on the next run; re-run to fall back to an older one")


def read_extra_state(path: Path) -> dict[str, Tensor]:
    """The checkpoint's extra tensors ({} when it has none)."""
    return load_file(path / EXTRA_FILE) if (path / EXTRA_FILE).is_file() else {}


def remove_checkpoints(phase_dir: Path) -> None:
    """After a phase's final is written its resumable checkpoints are no longer needed."""
    for _, path in complete_checkpoints(phase_dir):
        shutil.rmtree(path, ignore_errors=True)
    for tmp in phase_dir.glob("checkpoint-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
