"""scripts/bench_plugins.py: the table and the issue's goal in process, and the whole bench end
to end on the tiny digits model (plugins trained for a few steps, a direct-1 student trained by
bench_quality.py first, an unfinished variant skipped)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, load_script, subprocess_env


def _bench():
    return load_script("bench_plugins")


def test_table_reports_effects_as_ratios_to_teacher_32_and_the_goal():
    bench = _bench()
    Row, Effect = bench.PluginRow, bench.PluginEffect
    rows = [Row("teacher", 32, 3.0, Effect(4.0, 6.0), Effect(0.5, 0.9), 0.95, 0.9, 0.93, 10.0),
            Row("ours", 4, 0.0, Effect(4.1, 6.0), Effect(0.5, 0.88), 0.94, 0.9, 0.9, 2.0),
            Row("mse", 4, 0.0, Effect(4.0, 5.0), Effect(0.6, 0.8), 0.9, 0.8, 0.8, 2.0)]
    lines = bench.table(rows).splitlines()
    assert "| style / teacher-32 [90% CI] |" in lines[0] and "| control / teacher-32 [90% CI] |" in lines[0]
    assert lines[3] == ("| ours | 4 | 4.10 → 6.00 | +1.90 | 0.95 | 0.500 → 0.880 | +0.380 | 0.95 | "
                        "94.0% | 90.0% | 90.0% |")
    assert [ok for _, ok in bench.goals(rows)] == [True, True]
    ours_low = bench.PluginRow("ours", 4, 0.0, Effect(4.0, 5.7), Effect(0.5, 0.88), 0.9, 0.9, 0.9, 2.0)
    assert [ok for _, ok in bench.goals([rows[0], ours_low])] == [False, True]  # 0.85 of the style
    assert [ok for _, ok in bench.goals([rows[0], rows[2]])] == []  # no ours-4 row, no verdict
    mse = rows[2].to_json(rows[0])
    assert mse["style_ratio"] == pytest.approx(0.5) and mse["control_ratio"] == pytest.approx(0.5)
    assert mse["style_ratio_ci90"] is None  # no per-image values: no interval

    # From per-image values (as the bench measures them) the ratio gets its paired interval.
    g = torch.Generator().manual_seed(0)
    base = torch.rand(50, generator=g)
    teacher = Effect.of(base, base + 1 + 0.1 * torch.randn(50, generator=g))
    student = Effect.of(base, base + 0.8 + 0.1 * torch.randn(50, generator=g))
    with_ci = [Row("teacher", 32, 3.0, teacher, teacher, 1, 1, 1, 1), Row("ours", 4, 0.0, student, teacher, 1, 1, 1, 1)]
    lo, hi = with_ci[1].to_json(with_ci[0])["style_ratio_ci90"]
    assert lo < student.ratio(teacher) < hi
    cell = bench.table(with_ci).splitlines()[3].split(" | ")[4]
    assert cell == f"{student.ratio(teacher):.2f} [{lo:.2f}, {hi:.2f}]"


def test_report_names_plugins_under_the_working_directory_relatively(tmp_path, monkeypatch):
    bench = _bench()
    monkeypatch.chdir(tmp_path)
    assert bench.shown_path(tmp_path / "runs" / "plugins" / "style") == "runs/plugins/style"
    outside = tmp_path.parent / "elsewhere"
    assert bench.shown_path(outside) == str(outside.resolve())  # committed reports: no guessing


@pytest.mark.e2e
def test_bench_plugins_end_to_end_on_the_tiny_model(digits_cache, digits_dir, tmp_path):
    from train.digits.data import read_model_info

    common = ["--config", "configs/tiny.yaml", "--override", f"model.cache_dir={digits_cache}",
              "--runs-root", str(tmp_path / "runs"), "--per-digit", "2"]
    trained = subprocess.run(
        [sys.executable, "scripts/bench_quality.py", *common, "--variants", "direct-1",
         "--teacher-steps", "1", "--out", str(tmp_path / "quality")],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]

    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "scripts/bench_plugins.py", *common, "--variants", "direct-1", "mse",
         "--teacher-steps", "2", "--lora-steps", "25", "--controlnet-steps", "25",
         "--plugins-root", str(tmp_path / "plugins"), "--out", str(out)],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[plugins] mse: run" in result.stdout and "not finished" in result.stdout  # never trained here
    rows = json.loads((out / "plugins_results.json").read_text())
    # direct-1 is the x0-prediction export, through the student's own pipeline and scheduler
    cfg = read_model_info(digits_dir)["guidance_scale"]  # the teacher's CFG, students none
    assert [(r["name"], r["steps"], r["guidance"]) for r in rows] == [
        ("teacher", 32, cfg), ("teacher", 2, cfg), ("direct", 1, 0.0)]
    for r in rows:
        for key in ("stroke_width", "stroke_width_lora", "style_effect", "iou", "iou_controlnet",
                    "control_effect", "accuracy", "accuracy_lora", "accuracy_controlnet"):
            assert math.isfinite(r[key]), (r["name"], r["steps"], key)
        assert len(r["style_ratio_ci90"]) == 2 and len(r["control_ratio_ci90"]) == 2
        assert 0 <= r["iou"] <= 1 and 0 <= r["iou_controlnet"] <= 1 and r["stroke_width"] > 0
    teacher = rows[0]
    for kind in ("style", "control"):  # the reference keeps all of its own effect
        if teacher[f"{kind}_effect"] != 0:
            assert teacher[f"{kind}_ratio"] == pytest.approx(1.0)
    assert (tmp_path / "plugins").is_dir() and len(list((tmp_path / "plugins").iterdir())) == 2
    assert "| direct | 1 |" in (out / "plugins_results.md").read_text()
    # grids: teacher-32 (the only grid model present) without / with each plugin, 2 samples of
    # 32 px at 2x, 12 px gutters; the control grid adds the target silhouettes' column
    height = 10 * 32 * 2 + 18 + 12
    assert Image.open(out / "plugins_style.png").size == (2 * (2 * 32 * 2 + 12) + 12, height)
    assert Image.open(out / "plugins_control.png").size == (3 * (2 * 32 * 2 + 12) + 12, height)
