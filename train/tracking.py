"""Where a run reports: metrics.jsonl (always), wandb (optional), validation images to both.

wandb honours WANDB_MODE (offline works with no network, pitfall 8); the run id is kept in
the run directory (`RunLayout.wandb_id_file`) so a resumed run continues the same wandb run.
Only the main process writes. wandb is imported only when enabled: it is an optional, heavy
import (a second of start-up) most runs without `logging.wandb` never need.

Rows are keyed by what they report (`row_key`: the event, stage, phase, global step and image
name), and a key already in metrics.jsonl is not written again: a run resumed from a
checkpoint redoes the steps after it and would otherwise log them twice (its rows equal the
first ones but for the time). The first row stays, and wandb, which drops steps it has seen,
gets no repeat either. A row torn by a kill stays on its own line (the file is continued on
a new line) and is written again, whole, by the resumed run.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

from train.config import LoggingConfig
from train.files import write_text_atomic
from train.layout import RunLayout

log = logging.getLogger("train")


class Tracker:
    def __init__(self, layout: RunLayout, cfg: LoggingConfig, run_config: dict, is_main: bool):
        self.layout = layout
        self.is_main = is_main
        self.metrics_path = layout.metrics_file
        self.wandb_run = None
        self.logged: set[tuple] = set()
        if is_main:
            self.logged = {row_key(row) for row in read_metrics(layout.root)}
            _end_torn_line(self.metrics_path)
        if is_main and cfg.wandb:
            self.wandb_run = _init_wandb(layout, cfg.wandb_project, run_config)

    def log(self, row: dict) -> None:
        """Append a row unless one with its key is there already (a resumed run's repeat)."""
        if not self.is_main or row_key(row) in self.logged:
            return
        self.logged.add(row_key(row))
        row = {"time": round(time.time(), 3), **row}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if isinstance(v, (int, float))},
                               step=row.get("global_step"))

    def log_image(self, name: str, path: Path, global_step: int, caption: str = "") -> None:
        """Validation grids go to every tracker: the PNG is already in samples/."""
        row = {"global_step": global_step, "event": "image", "name": name, "path": str(path)}
        if not self.is_main or row_key(row) in self.logged:
            return
        self.log(row)
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Image(str(path), caption=caption)}, step=global_step)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def row_key(row: dict) -> tuple:
    """What a row reports: (event, stage, phase, global step, image name); a step's row has
    the event "step"."""
    return (row.get("event", "step"), row.get("stage"), row.get("phase"), row.get("global_step"),
            row.get("name"))


def _end_torn_line(path: Path) -> None:
    """A kill in the middle of a row leaves the file without its final newline: end that line,
    so the next row starts on its own instead of continuing the torn one."""
    try:
        with path.open("rb+") as f:
            size = f.seek(0, 2)
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    f.write(b"\n")
    except FileNotFoundError:
        pass


def _init_wandb(layout: RunLayout, project: str, run_config: dict):
    import wandb

    id_file = layout.wandb_id_file
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    write_text_atomic(id_file, run_id)
    return wandb.init(project=project, id=run_id, resume="allow", dir=str(layout.root),
                      name=layout.root.name, config=run_config)


def read_metrics(output_dir: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, in order ([] before the first). A line that does not
    parse (a row torn by a kill, then continued by the resumed run) is skipped with a warning."""
    path = RunLayout(Path(output_dir), ()).metrics_file
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            log.warning("%s:%d: not a JSON row (torn by an interrupted write?); skipped", path, number)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
