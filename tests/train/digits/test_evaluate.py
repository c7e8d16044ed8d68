"""python -m train.digits.evaluate: the Markdown table of digits-FD, prompt accuracy and the
coverage metrics of a model folder, and its sample grids."""

from __future__ import annotations

import pytest
from PIL import Image

from train.digits.builder import ensure_digits_model
from train.digits.evaluate import main


def test_cli_prints_the_table_and_writes_grids(digits_cache, tmp_path, capsys):
    model = ensure_digits_model(digits_cache, "tiny")
    grid = tmp_path / "digits_{steps}.png"
    main(["--model", str(model), "--steps", "2", "1", "--per-digit", "2", "--cache-root", str(digits_cache),
          "--grid", str(grid)])
    out = capsys.readouterr().out
    header = "| steps | guidance | FD ↓ | accuracy ↑ | precision ↑ | recall ↑ | diversity |"
    assert header in out
    rows = [line for line in out.splitlines() if line.startswith(("| 2 |", "| 1 |", "| real"))]
    assert len(rows) == 3
    for row in rows:  # every metric cell is a finite number; probabilities within [0, 1]
        cells = [float(c) for c in row.strip("|").split("|")[2:]]
        assert len(cells) == 5 and all(c == c and abs(c) < 1e6 for c in cells)
        assert all(0 <= c <= 1 for c in cells[1:4])
    real = next(r for r in rows if r.startswith("| real"))
    assert float(real.split("|")[5]) > 0.8  # recall of the training digits against held-out
    # 10 digits × 2 samples, 1 px gutters around 32 px tiles
    assert Image.open(tmp_path / "digits_1.png").size == (2 * 33 + 1, 10 * 33 + 1)


@pytest.mark.gpu
def test_rendering_on_cuda_scores_like_the_cpu(digits_cache, capsys):
    """--device cuda draws the same CPU noise, so only kernel rounding differs: the scores agree
    to within what fp32 reduction order moves (on the digits model, teacher-32 at 1,000 images
    scored FD 118.2 on an H100 and 118.1 on the CPU)."""
    model = ensure_digits_model(digits_cache, "tiny")
    scores = {}
    for device in ("cpu", "cuda"):
        main(["--model", str(model), "--steps", "4", "--per-digit", "4", "--cache-root", str(digits_cache),
              "--device", device])
        row = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("| 4 |"))
        scores[device] = [float(c) for c in row.strip("|").split("|")[2:]]
    assert scores["cuda"] == pytest.approx(scores["cpu"], rel=0.02, abs=0.02)
