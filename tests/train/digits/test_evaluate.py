"""python -m train.digits.evaluate: the Markdown table of digits-FD and prompt accuracy of a
model folder, and its sample grids."""

from __future__ import annotations

from PIL import Image

from train.digits.builder import ensure_digits_model
from train.digits.evaluate import main


def test_cli_prints_the_table_and_writes_grids(digits_cache, tmp_path, capsys):
    model = ensure_digits_model(digits_cache, "tiny")
    grid = tmp_path / "digits_{steps}.png"
    main(["--model", str(model), "--steps", "2", "1", "--per-digit", "2", "--cache-root", str(digits_cache),
          "--grid", str(grid)])
    out = capsys.readouterr().out
    assert "| steps | guidance | FD ↓ | accuracy ↑ |" in out and "| real (train vs held-out) |" in out
    rows = [line for line in out.splitlines() if line.startswith(("| 2 |", "| 1 |"))]
    assert len(rows) == 2
    # 10 digits × 2 samples, 1 px gutters around 32 px tiles
    assert Image.open(tmp_path / "digits_1.png").size == (2 * 33 + 1, 10 * 33 + 1)
