"""Where a run reports: metrics.jsonl (always), wandb (optional), validation images to both.

wandb honours WANDB_MODE (offline works with no network, pitfall 8); the run id is kept in
`<output_dir>/wandb_id.txt` so a resumed run continues the same wandb run. Only the main
process writes.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

from train.config import LoggingConfig

log = logging.getLogger("train")


class Tracker:
    def __init__(self, output_dir: Path, cfg: LoggingConfig, run_config: dict, is_main: bool):
        self.output_dir = output_dir
        self.is_main = is_main
        self.metrics_path = output_dir / "metrics.jsonl"
        self.wandb_run = None
        if is_main and cfg.wandb:
            self.wandb_run = _init_wandb(output_dir, cfg.wandb_project, run_config)

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


def _init_wandb(output_dir: Path, project: str, run_config: dict):
    import wandb

    id_file = output_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
    id_file.write_text(run_id)
    return wandb.init(project=project, id=run_id, resume="allow", dir=str(output_dir),
                      name=output_dir.name, config=run_config)


def read_metrics(output_dir: Path) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
