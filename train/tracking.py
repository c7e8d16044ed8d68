"""Where a run reports: metrics.jsonl (always), wandb (optional), validation images to both.

wandb honours WANDB_MODE (offline works with no network, pitfall 8); the run id is kept in
the run directory (`RunLayout.wandb_id_file`) so a resumed run continues the same wandb run.
Only the main process writes. wandb is imported only when enabled: it is an optional, heavy
import (a second of start-up) most runs without `logging.wandb` never need.
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
        if is_main and cfg.wandb:
            self.wandb_run = _init_wandb(layout, cfg.wandb_project, run_config)

    def log(self, row: dict) -> None:
        if not self.is_main:
            return
        row = {"time": round(time.time(), 3), **row}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in row.items() if isinstance(v, (int, float))},
                               step=row.get("global_step"))

    def log_image(self, name: str, path: Path, global_step: int, caption: str = "") -> None:
        """Validation grids go to every tracker: the PNG is already in samples/."""
        if not self.is_main:
            return
        self.log({"global_step": global_step, "event": "image", "name": name, "path": str(path)})
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({name: wandb.Image(str(path), caption=caption)}, step=global_step)

    def finish(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


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
