"""train/tracking.py without wandb (the end-to-end loop test runs wandb offline)."""

from train.config import LoggingConfig
from train.layout import RunLayout
from train.tracking import Tracker, read_metrics


def test_main_process_appends_rows_in_order_and_others_write_nothing(tmp_path):
    layout = RunLayout(tmp_path, ())
    main = Tracker(layout, LoggingConfig(wandb=False), {}, is_main=True)
    other = Tracker(layout, LoggingConfig(wandb=False), {}, is_main=False)
    main.log({"global_step": 1, "loss": 0.5})
    other.log({"global_step": 1, "loss": 9.0})
    main.log({"global_step": 2, "loss": 0.25})
    rows = read_metrics(tmp_path)
    assert [r["loss"] for r in rows] == [0.5, 0.25]
    assert all(isinstance(r["time"], float) for r in rows)
    assert layout.metrics_file.is_file()
    main.finish()


def test_images_are_logged_as_rows_pointing_at_the_png(tmp_path):
    tracker = Tracker(RunLayout(tmp_path, ()), LoggingConfig(wandb=False), {}, is_main=True)
    png = tmp_path / "samples" / "grid.png"
    tracker.log_image("samples/8step", png, 7, caption="8-step")
    (row,) = read_metrics(tmp_path)
    assert row == {**row, "event": "image", "name": "samples/8step", "path": str(png), "global_step": 7}


def test_no_metrics_yet_reads_as_empty(tmp_path):
    assert read_metrics(tmp_path / "nothing") == []
