"""train/tracking.py without wandb (the end-to-end loop test runs wandb offline)."""

from train.config import LoggingConfig
from train.layout import RunLayout
from train.tracking import Tracker, read_metrics, row_key


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


def test_a_resumed_run_appends_no_row_twice(tmp_path):
    """Rows are keyed by (event, stage, phase, global step, image name): a second tracker on
    the same run (a resume that redoes steps 2-3) writes only what is new."""
    layout = RunLayout(tmp_path, ())
    first = Tracker(layout, LoggingConfig(wandb=False), {}, is_main=True)
    for step in (1, 2, 3):
        first.log({"global_step": step, "stage": "8step", "phase": "0_mse", "step": step, "loss": step / 10})
    first.log_image("samples/8step", tmp_path / "grid.png", 3)
    resumed = Tracker(layout, LoggingConfig(wandb=False), {}, is_main=True)
    for step in (2, 3, 4):
        resumed.log({"global_step": step, "stage": "8step", "phase": "0_mse", "step": step, "loss": 9.0})
    resumed.log_image("samples/8step", tmp_path / "grid.png", 3)  # the grid's row is there already
    resumed.log({"global_step": 4, "event": "phase_end", "stage": "8step", "phase": "0_mse"})
    rows = read_metrics(tmp_path)
    assert [(r.get("event"), r["global_step"]) for r in rows] == [
        (None, 1), (None, 2), (None, 3), ("image", 3), (None, 4), ("phase_end", 4)]
    assert [r["loss"] for r in rows if "loss" in r] == [0.1, 0.2, 0.3, 9.0]  # the first row stays
    assert len({row_key(r) for r in rows}) == len(rows)


def test_a_row_torn_by_a_kill_is_written_again_on_its_own_line(tmp_path):
    layout = RunLayout(tmp_path, ())
    layout.metrics_file.write_text('{"global_step": 1, "step": 1, "loss": 0.5}\n{"global_step": 2, "st')
    tracker = Tracker(layout, LoggingConfig(wandb=False), {}, is_main=True)
    tracker.log({"global_step": 1, "step": 1, "loss": 0.5})
    tracker.log({"global_step": 2, "step": 2, "loss": 0.25})
    lines = layout.metrics_file.read_text().splitlines()
    assert lines[1] == '{"global_step": 2, "st'  # the torn fragment, alone
    assert [r["global_step"] for r in read_metrics(tmp_path)] == [1, 2]
