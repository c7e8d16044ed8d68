"""Bad training data, in real tar shards: every bad sample is skipped and counted by reason,
every odd-but-valid image is converted deliberately and counted by kind (16-bit with its full
range, alpha composited on white), and data that yields nothing is a one-line DataError: before
any model loads when the shards are missing, empty, not tars or hold no usable sample, and from
the stream (also from DataLoader workers) when the data goes bad later."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tar
from faults import one_line_error
from PIL import Image

import train.loop
from train.__main__ import main as train_main
from train.data import MAX_ASPECT, image_loader, image_loader_single_pass, to_rgb8
from train.errors import DataError, run_cli

ROOT = Path(__file__).resolve().parents[2]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def png16(array: np.ndarray) -> bytes:
    """A real 16-bit PNG (grayscale for 2-D arrays, RGB for (H, W, 3)), written byte by byte:
    PIL writes 16-bit grayscale but no 16-bit RGB."""
    h, w = array.shape[:2]
    color_type = 2 if array.ndim == 3 else 0
    rows = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


GRAY16 = np.full((16, 16), 40000, dtype=np.uint16)  # 40000 / 65535: a mid-light gray
RGB = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)


def _transparent_palette_png() -> bytes:
    palette = Image.fromarray(RGB).convert("P")
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])  # that colour is see-through
    return _encoded(palette, "PNG")


def _bad_and_odd_samples() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    good = _png(RGB)
    clear = np.concatenate([RGB, np.zeros((16, 16, 1), np.uint8)], -1)  # fully transparent
    return {
        # skipped, each with its reason
        "garbage.png": b"\x89PNG\r\n\x1a\n not really", "garbage.txt": b"a digit",
        "torn.png": good[: len(good) // 2], "torn.txt": b"a digit",
        "nocap.png": good,
        "emptycap.png": good, "emptycap.txt": b" \n\t",
        "badutf8.png": good, "badutf8.txt": b"\xff\xfe\xfa",
        "sliver.png": _png(rng.integers(0, 256, (2, 2 * MAX_ASPECT + 2, 3), dtype=np.uint8)), "sliver.txt": b"wide",
        "noimage.txt": b"a caption alone",
        # converted and used, counted by kind
        "gray.png": _png(RGB[..., 0]), "gray.txt": b"grayscale",
        "rgba.png": _png(np.concatenate([RGB, np.full((16, 16, 1), 128, np.uint8)], -1)), "rgba.txt": b"alpha",
        "clear.png": _png(clear), "clear.txt": b"transparent everywhere",
        "graya.png": _encoded(Image.fromarray(RGB[..., 0]).convert("LA"), "PNG"), "graya.txt": b"gray + alpha",
        "gray16.png": _png(GRAY16), "gray16.txt": b"sixteen bits",
        "rgb16.png": png16(RGB.astype(np.uint16) * 257), "rgb16.txt": b"48-bit RGB",
        "tiny.png": _png(RGB[:4, :4]), "tiny.txt": b"four by four",
        "tall.png": _png(rng.integers(0, 256, (160, 12, 3), dtype=np.uint8)), "tall.txt": b"1:13",
        "palette.png": _encoded(Image.fromarray(RGB).convert("P"), "PNG"), "palette.txt": b"palette",
        "seethru.png": _transparent_palette_png(), "seethru.txt": b"palette with a transparent colour",
        "cmyk.jpg": _encoded(Image.fromarray(RGB).convert("CMYK"), "JPEG"), "cmyk.txt": b"print",
        "badjson.png": good, "badjson.txt": b"metadata torn", "badjson.json": b'{"width": 16, "hei',
        "listjson.png": good, "listjson.txt": b"metadata not an object", "listjson.json": b"[16, 16]",
    }


SKIPS = {"undecodable_image": 1, "corrupt_image": 1, "missing_caption": 1, "empty_caption": 1,
         "bad_caption": 1, "extreme_aspect": 1, "missing_image": 1}
CONVERTED = {"grayscale": 1, "alpha": 4, "16bit": 1, "palette": 1, "cmyk": 1, "invalid_json": 2}
USED = ["badjson", "clear", "cmyk", "gray", "gray16", "graya", "listjson", "palette", "rgb16", "rgba",
        "seethru", "tall", "tiny"]


def test_bad_samples_are_skipped_by_reason_and_odd_images_converted_by_kind(tmp_path):
    shard = write_tar(tmp_path / "samples.tar", _bad_and_odd_samples())
    stream = image_loader_single_pass(str(shard), batch_size=64, resolution=16, rank=0, world_size=1)
    (batch,) = list(stream)
    assert sorted(batch.keys) == USED
    assert stream.skip_counts == SKIPS
    assert stream.converted_counts == CONVERTED
    pixels = batch.pixels
    assert pixels.shape[1:] == (3, 16, 16) and bool(pixels.isfinite().all())
    assert float(pixels.min()) >= -1 and float(pixels.max()) <= 1

    def image(key: str) -> np.ndarray:  # back to 0..255
        return ((pixels[batch.keys.index(key)] + 1) * 127.5).permute(1, 2, 0).numpy()

    # 16-bit scaled to 8 bits (40000 / 257 = 155.6), not clipped to white (255)
    assert abs(float(image("gray16").mean()) - 155.6) < 1 and float(image("gray16").std()) < 1e-3
    assert np.abs(image("rgb16") - RGB).max() < 0.51  # PIL keeps 48-bit RGB's high bytes
    # alpha composited on white: see-through is white, half-transparent halfway to white
    assert np.abs(image("clear") - 255).max() < 0.51
    assert np.abs(image("rgba") - (RGB.astype(float) * 128 + 255 * 127) / 255).max() < 1.01
    assert np.abs(image("seethru")[0, 0] - 255).max() < 0.51
    assert np.abs(image("graya") - RGB[..., :1]).max() < 0.51  # opaque LA: the gray itself
    assert np.abs(image("cmyk") - RGB).mean() < 10  # PIL's CMYK round trip through JPEG


def test_a_16bit_png_keeps_its_full_range(tmp_path):
    """A 0..65535 ramp in a real 16-bit PNG in a real tar shard, through the training loader:
    8-bit pixels span 0..255 evenly. PIL's plain convert("RGB") clips it (99.6 % white)."""
    ramp = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    data = png16(ramp)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.mode == "I;16"
        clipped = np.asarray(raw.convert("RGB"))
        converted, kind = to_rgb8(raw)
    assert kind == "16bit" and float((clipped == 255).mean()) > 0.99
    shard = write_tar(tmp_path / "ramp.tar", {"ramp.png": data, "ramp.txt": b"a ramp"})
    stream = image_loader_single_pass(str(shard), batch_size=1, resolution=64, rank=0, world_size=1)
    (batch,) = list(stream)
    pixels = ((batch.pixels[0] + 1) * 127.5).round().numpy()
    assert stream.converted_counts == {"16bit": 1}
    assert pixels.min() == 0 and pixels.max() == 255
    assert float((pixels == 255).mean()) < 0.01  # 0.2 % (the top half-step of the ramp)
    assert abs(float(pixels.mean()) - 127.5) < 0.5
    assert np.abs(pixels[0] - np.round(ramp / 257.0)).max() <= 1  # bicubic at the same size


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


# ----------------------------------------------------------------------------- before any model loads


def _junk_shards(tmp_path: Path, case: str) -> str:
    """A shard pattern that fails the start-up check in one way; returns data.train_shards."""
    good = {"g.png": _png(RGB), "g.txt": b"fine"}
    if case == "none_exists":
        return f"{tmp_path}/none-{{000..009}}.tar"
    if case == "one_missing":
        for i in (0, 1, 3):
            write_tar(tmp_path / f"part-{i}.tar", good)
        return f"{tmp_path}/part-{{0..3}}.tar"
    if case == "empty_tar":
        write_tar(tmp_path / "part-0.tar", good)
        write_tar(tmp_path / "part-1.tar", {})
        return f"{tmp_path}/part-{{0..1}}.tar"
    if case == "empty_file":
        write_tar(tmp_path / "part-0.tar", good)
        (tmp_path / "part-1.tar").write_bytes(b"")
        return f"{tmp_path}/part-{{0..1}}.tar"
    if case == "not_a_tar":
        (tmp_path / "part-0.tar").write_bytes(b"not a tar" * 100)
        return str(tmp_path / "part-0.tar")
    if case == "all_bad_samples":
        write_tar(tmp_path / "part-0.tar", {f"k{i}.png": b"x" for i in range(5)})
        write_tar(tmp_path / "part-1.tar", {"k.png": _png(RGB), "k.txt": b" "})
        return f"{tmp_path}/part-{{0..1}}.tar"
    raise ValueError(case)


EARLY_ERRORS = {
    "none_exists": "error: no shard file exists, the first: {tmp}/none-000.tar (data.train_shards={tmp}/none-{{000..009}}.tar)",
    "one_missing": "error: 1 of 4 shard files are missing, the first: {tmp}/part-2.tar (data.train_shards={tmp}/part-{{0..3}}.tar)",
    "empty_tar": "error: shard {tmp}/part-1.tar is an empty tar file (no member) (data.train_shards={tmp}/part-{{0..1}}.tar)",
    "empty_file": "error: shard {tmp}/part-1.tar is not a readable tar file (ReadError: empty file)",
    "not_a_tar": "error: shard {tmp}/part-0.tar is not a readable tar file (ReadError: ",
    "all_bad_samples": "error: no usable sample among the first 6 of the shards (skipped: "
                       "{{'missing_caption': 5, 'empty_caption': 1}}) (data.train_shards={tmp}/part-{{0..1}}.tar)",
}


@pytest.mark.parametrize("case", sorted(EARLY_ERRORS))
def test_bad_shards_end_in_one_line_before_any_model_loads(case, tmp_path, digits_cache, capsys, monkeypatch):
    def no_model_loads(*args, **kwargs):
        raise AssertionError("a model was loaded before the shards were checked")

    monkeypatch.setattr(train.loop, "load_base", no_model_loads)
    argv = [str(ROOT / "configs/tiny.yaml"), f"output_dir={tmp_path / 'run'}", f"model.cache_dir={digits_cache}",
            f"data.train_shards={_junk_shards(tmp_path, case)}"]
    capsys.readouterr()
    assert run_cli(lambda: train_main(argv)) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith(EARLY_ERRORS[case].format(tmp=tmp_path)), line
    assert line.endswith("or data.latent_shards"), line  # what to do: check data.train_shards ...
