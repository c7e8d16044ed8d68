"""scripts/bench_quality.py: the coverage columns and the mode-coverage expectation in process,
and the direct-adversarial baseline trained and evaluated for real on the tiny digits model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from tests.conftest import ROOT, load_script, subprocess_env


def _bench():
    return load_script("bench_quality")


def test_table_shows_diversity_relative_to_teacher_32_and_the_coverage_claim():
    bench = _bench()
    Row = bench.Row
    rows = [Row("teacher", 32, 10.0, 0.95, 0.8, 0.9, 40.0, 0.02, 100),
            Row("ours", 4, 11.0, 0.94, 0.8, 0.85, 36.0, 0.003, 100),
            Row("direct", 4, 12.0, 0.96, 0.9, 0.5, 20.0, 0.003, 100),
            Row("ours", 1, 14.0, 0.9, 0.7, 0.6, 30.0, 0.001, 100),
            Row("direct", 1, 13.0, 0.9, 0.8, 0.7, 32.0, 0.001, 100)]
    lines = bench.table(rows).splitlines()
    assert "| precision ↑ | recall ↑ | diversity / teacher-32 |" in lines[0]
    assert lines[3] == "| ours | 4 | 11.000 | 94.0% | 0.800 | 0.850 | 0.90 | 1.10 | 0.150 |"
    g = torch.Generator().manual_seed(0)
    div = 10 + torch.rand(200, generator=g)
    covered = torch.ones(100, dtype=torch.float64)
    half = torch.cat([torch.ones(50), torch.zeros(50)]).double()
    coverage = {("teacher", 32): bench.CoverageSamples(covered, div),
                ("ours", 4): bench.CoverageSamples(covered, div * 0.99),
                ("direct", 4): bench.CoverageSamples(half, div * 0.5)}
    claim = bench.coverage_claim(coverage)
    assert claim[0].startswith("| comparison | recall difference [90% CI] |")
    by_pair = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in claim[2:]}
    assert list(by_pair) == ["ours-4 − direct-4", "ours-4 − teacher-32", "direct-4 − teacher-32"]
    recall, recall_side, div_cell, div_side = by_pair["ours-4 − direct-4"]
    assert recall.startswith("+0.500 [") and recall_side == "ours-4"
    assert div_cell.startswith("+0.49") and div_side.startswith("ours-4")  # in teacher-32 units
    # identical coverage: a zero-width interval at 0 names neither side
    assert by_pair["ours-4 − teacher-32"][:2] == ["+0.000 [+0.000, +0.000]", "neither (interval spans 0)"]
    assert by_pair["direct-4 − teacher-32"][3].startswith("teacher-32")
    assert bench.coverage_claim({("teacher", 32): coverage[("teacher", 32)]}) == []  # nothing to compare
    assert bench.row_name("direct-4") == "direct" and bench.row_name("ours") == "ours"


def test_seed_report_gives_mean_sd_and_checks_targets_on_the_mean_and_every_seed():
    bench = _bench()
    Row = bench.Row
    teacher = [Row("teacher", n, fd, 0.98, 0.8, 0.9, 40.0, 0.02, 100)
               for n, fd in ((32, 100.0), (8, 120.0), (4, 140.0), (2, 300.0), (1, 700.0))]
    students = []
    for seed, ours4 in ((0, 110.0), (1, 130.0)):  # seed 1 misses "ours-4 <= 1.2 x teacher-32"
        for n in (8, 4, 2, 1):
            students.append(Row("ours", n, ours4 if n == 4 else 100.0, 0.97, 0.8, 0.9, 38.0, 0.01, 100, seed))
            students.append(Row("mse", n, 200.0, 0.97, 0.8, 0.9, 38.0, 0.01, 100, seed))
    rows = teacher + students
    mean = {(r.name, r.steps): r for r in bench.mean_rows(rows)}
    assert mean[("ours", 4)].fd == pytest.approx(120.0) and mean[("teacher", 32)].fd == 100.0
    lines = bench.seeds_table(rows, [0, 1]).splitlines()
    assert lines[0].startswith("| model | steps | digits-FD ↓ (mean ± sd) | FD seed 0 | FD seed 1 |")
    ours4 = next(line for line in lines if line.startswith("| ours | 4 |"))
    # sample sd of (110, 130) = 14.1; FD / teacher-32 of the mean = 1.20
    assert ours4.startswith("| ours | 4 | 120.0 ± 14.1 | 110.0 | 130.0 | 97.0 ± 0.0% |")
    assert ours4.endswith("| 0.95 | 1.20 |")
    targets = {line.split(" | ")[0][2:]: line for line in bench.seed_targets(rows, [0, 1])[2:]}
    assert targets["ours-4 FD <= 1.2 x teacher-32 FD"].endswith("| yes | yes | NO |")
    assert targets["ours-1 beats MSE-1 by >= 25% on FD"].endswith("| yes | yes | yes |")
    # a seed without a row (an unfinished export) shows "—" for the targets that need it
    partial = [r for r in rows if not (r.train_seed == 1 and r.name == "ours" and r.steps == 1)]
    targets = {line.split(" | ")[0][2:]: line for line in bench.seed_targets(partial, [0, 1])[2:]}
    assert targets["ours-1 beats MSE-1 by >= 25% on FD"].endswith("| yes | yes | — |")
    assert targets["ours-4 FD <= 1.2 x teacher-32 FD"].endswith("| yes | yes | NO |")


def test_targets_are_checked_only_where_this_run_has_their_rows():
    """`--teacher-steps 4` renders no teacher-8/2/1: those targets are left out, not a crash."""
    bench = _bench()
    Row = bench.Row
    rows = [Row("teacher", 32, 100.0, 0.98, 0.8, 0.9, 40.0, 0.02, 100),
            Row("teacher", 4, 140.0, 0.98, 0.8, 0.9, 40.0, 0.005, 100)]
    rows += [Row(name, n, fd, 0.97, 0.8, 0.9, 38.0, 0.003, 100)
             for name, fd in (("ours", 110.0), ("mse", 140.0)) for n in (8, 4, 2, 1)]
    checks = dict(bench.targets(rows))
    assert "ours-8 beats teacher-8 on FD" not in checks and "ours-1 beats teacher-1 on FD" not in checks
    assert checks["ours-4 beats teacher-4 on FD"] and checks["ours-4 FD <= 1.2 x teacher-32 FD"]
    assert checks["ours-2 beats MSE-2 by >= 25% on FD"] is False  # 110 > 0.75 x 140
    assert len(checks) == 6


@pytest.mark.e2e
def test_direct_adversarial_variant_trains_and_gets_coverage_rows(digits_cache, tmp_path):
    """direct-4 only (the 1-step variant's recipe, x0 conversion first, is checked in
    tests/distill/test_phases.py): one stage straight from the base, then the rows."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "scripts/bench_quality.py", "--config", "configs/tiny.yaml",
         "--override", f"model.cache_dir={digits_cache}", "--variants", "direct-4",
         "--teacher-steps", "4", "--per-digit", "2", "--runs-root", str(tmp_path / "runs"),
         "--out", str(out), "--device", "cpu"],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads((out / "bench_results.json").read_text())
    assert [(r["name"], r["steps"]) for r in rows] == [("teacher", 32), ("teacher", 4), ("direct", 4)]
    for r in rows:
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1 and r["diversity"] > 0
    # The direct run is one stage straight from the base (its only stage is its step count).
    run = next((tmp_path / "runs").glob("direct-4-*"))
    assert [p.name for p in (run / "stages").iterdir() if p.is_dir()] == ["4step"]
    report = (out / "bench_results.md").read_text()
    assert "| direct | 4 |" in report and "| recall ↑ |" in report
    # The grid's columns: teacher-32, teacher-4, direct-4; 2 samples of 32 px at 3x, 12 px
    # gutters; 10 digits high plus an 18 px label row and a gutter.
    assert Image.open(out / "bench_side_by_side.png").size == (3 * (2 * 32 * 3 + 12) + 12,
                                                               10 * 32 * 3 + 18 + 12)
