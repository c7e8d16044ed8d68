"""Bad training data, in real tar shards: every bad sample is skipped and counted by reason,
every odd-but-valid image is converted, and data that yields nothing is a one-line DataError,
also from DataLoader workers and from a whole training run."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tar
from faults import one_line_error
from PIL import Image

from train.__main__ import main as train_main
from train.data import MAX_ASPECT, image_loader, image_loader_single_pass
from train.errors import DataError, run_cli

ROOT = Path(__file__).resolve().parents[2]


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


GRAY16 = np.full((16, 16), 40000, dtype=np.uint16)  # 40000 / 65535: a mid-light gray


def _bad_and_odd_samples() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    good = _png(rgb)
    return {
        # skipped, each with its reason
        "garbage.png": b"\x89PNG\r\n\x1a\n not really", "garbage.txt": b"a digit",
        "torn.png": good[: len(good) // 2], "torn.txt": b"a digit",
        "nocap.png": good,
        "emptycap.png": good, "emptycap.txt": b" \n\t",
        "badutf8.png": good, "badutf8.txt": b"\xff\xfe\xfa",
        "sliver.png": _png(rng.integers(0, 256, (2, 2 * MAX_ASPECT + 2, 3), dtype=np.uint8)), "sliver.txt": b"wide",
        "noimage.txt": b"a caption alone",
        # converted and used
        "gray.png": _png(rgb[..., 0]), "gray.txt": b"grayscale",
        "rgba.png": _png(np.concatenate([rgb, np.full((16, 16, 1), 128, np.uint8)], -1)), "rgba.txt": b"alpha",
        "gray16.png": _png(GRAY16), "gray16.txt": b"sixteen bits",
        "tiny.png": _png(rgb[:4, :4]), "tiny.txt": b"four by four",
        "tall.png": _png(rng.integers(0, 256, (160, 12, 3), dtype=np.uint8)), "tall.txt": b"1:13",
        "palette.png": _palette_png(rgb), "palette.txt": b"palette",
    }


def _palette_png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("P").save(buf, format="PNG")
    return buf.getvalue()


SKIPS = {"undecodable_image": 1, "corrupt_image": 1, "missing_caption": 1, "empty_caption": 1,
         "bad_caption": 1, "extreme_aspect": 1, "missing_image": 1}
USED = ["gray", "gray16", "palette", "rgba", "tall", "tiny"]


def test_bad_samples_are_skipped_by_reason_and_odd_images_converted(tmp_path):
    shard = write_tar(tmp_path / "samples.tar", _bad_and_odd_samples())
    stream = image_loader_single_pass(str(shard), batch_size=64, resolution=8, rank=0, world_size=1)
    (batch,) = list(stream)
    assert sorted(batch.keys) == USED
    assert stream.skip_counts == SKIPS
    pixels = batch.pixels
    assert pixels.shape[1:] == (3, 8, 8) and bool(pixels.isfinite().all())
    assert float(pixels.min()) >= -1 and float(pixels.max()) <= 1
    gray16 = (pixels[batch.keys.index("gray16")] + 1) * 127.5
    # 16-bit scaled to 8 bits (40000 / 257 = 155.6), not clipped to white (255)
    assert abs(float(gray16.mean()) - 155.6) < 1 and float(gray16.std()) < 1e-3


def test_torn_and_non_tar_shards_are_skipped_once_each(tmp_path):
    rng = np.random.default_rng(0)
    members = {}
    for i in range(4):
        members[f"t{i}.png"] = _png(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        members[f"t{i}.txt"] = b"torn shard"
    data = write_tar(tmp_path / "whole.tar", members).read_bytes()
    (tmp_path / "torn.tar").write_bytes(data[: len(data) * 2 // 3])  # inside the third image
    (tmp_path / "not_a.tar").write_bytes(b"PK\x03\x04 a zip file, say" * 40)
    good = write_tar(tmp_path / "good.tar", {"g.png": _png(np.zeros((8, 8, 3), np.uint8)), "g.txt": b"fine"})
    urls = [str(tmp_path / "torn.tar"), str(tmp_path / "not_a.tar"), str(good)]
    stream = image_loader_single_pass(urls, batch_size=64, resolution=8, rank=0, world_size=1)
    keys = [k for b in stream for k in b.keys]
    assert keys[-1] == "g" and set(keys[:-1]) <= {"t0", "t1"}  # what preceded the tear survives
    assert stream.skip_counts.get("corrupt_tar") == 2


@pytest.mark.parametrize("workers", [0, 2])
def test_data_that_yields_nothing_is_one_data_error(tmp_path, workers):
    junk = write_tar(tmp_path / "uncaptioned.tar", {f"k{i}.png": b"x" for i in range(20)})
    stream = image_loader(str(junk), batch_size=2, resolution=8, seed=0, rank=0, world_size=1,
                          resume_step=0, shuffle_buffer=0, num_workers=workers)
    with pytest.raises(DataError) as err:
        next(iter(stream))
    message = str(err.value)
    assert "\n" not in message and "samples in a row were unusable" in message  # not a worker traceback
    assert str(junk) in message and "missing_caption" in message


def test_training_on_all_bad_shards_ends_in_one_line(tmp_path, digits_cache, capsys):
    (tmp_path / "junk-0.tar").write_bytes(b"not a tar" * 100)
    (tmp_path / "junk-1.tar").write_bytes(b"")
    argv = [str(ROOT / "configs/tiny.yaml"), f"output_dir={tmp_path / 'run'}", f"model.cache_dir={digits_cache}",
            f"data.train_shards={tmp_path}/junk-{{0..1}}.tar"]
    capsys.readouterr()
    assert run_cli(lambda: train_main(argv)) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("error: 101 shards in a row held no sample"), line
    assert "check data.train_shards" in line
