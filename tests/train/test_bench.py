"""The throughput bench: exclusive split timing, and the CLI on the tiny digits preset."""

import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, subprocess_env
from train.bench import PhaseBench, SplitTimer


def test_split_timer_gives_nested_time_to_the_innermost_bucket():
    timer = SplitTimer()
    with timer.bucket("other"):
        time.sleep(0.02)
        with timer.bucket("teacher"):
            time.sleep(0.04)
        timer.push("student_fwd")
        timer.replace_top("student_bwd")  # a gradient hook switching buckets mid-backward
        time.sleep(0.02)
        timer.pop()
    assert timer.totals["teacher"] == pytest.approx(0.04, abs=0.015)
    assert timer.totals["other"] == pytest.approx(0.02, abs=0.015)
    assert timer.totals["student_bwd"] == pytest.approx(0.02, abs=0.015)
    assert "student_fwd" not in timer.totals or timer.totals["student_fwd"] < 0.005


def test_overhead_is_the_median_ratio():
    row = PhaseBench("mse (full)", 1, {"teacher": 1.0}, {"teacher": 1.0}, ratios=[1.3, 1.0, 1.1])
    assert row.overhead == 1.1


@pytest.mark.e2e
def test_bench_cli_prints_the_split_for_every_phase_kind(digits_cache, tmp_path):
    out = subprocess.run(
        [sys.executable, "scripts/bench_throughput.py", "configs/tiny.yaml", f"model.cache_dir={digits_cache}",
         "--steps", "1", "--warmup", "0", "--json", str(tmp_path / "b.json")],
        cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for phase in ("mse (full)", "adv_conditional (lora)", "adv_unconditional (lora)",
                  "adv_unconditional (full)", "x0_convert (full)"):
        assert f"| {phase} |" in out.stdout
    assert "overhead" in out.stdout and "merge (fold the LoRA" in out.stdout
    assert (tmp_path / "b.json").is_file()
