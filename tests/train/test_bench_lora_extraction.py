"""scripts/bench_lora_extraction.py on the small SDXL-layout UNet: every target shape timed both
ways, the same relative error both ways, totals weighted by layer counts."""

from __future__ import annotations

from tests.conftest import load_script


def _bench():
    return load_script("bench_lora_extraction")


def test_shapes_are_the_lora_target_set_flattened():
    shapes = _bench().target_shapes("small")
    assert sum(shapes.values()) == 198  # the small spec's LCM-LoRA target layers
    assert (64, 64 * 3 * 3) in shapes  # a 3×3 conv, flattened to out × in·kh·kw


def test_table_has_every_shape_and_equal_errors(capsys):
    bench = _bench()
    assert bench.main(["--spec", "small", "--rank", "8", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| shape")]
    assert len(rows) == len(bench.target_shapes("small")) + 1  # + the whole-UNet total
    total = rows[-1].split("|")
    assert total[1].strip() == "**whole UNet**" and total[2].strip() == "198"
    assert all(float(row.split("|")[6]) < 1e-9 for row in rows)
