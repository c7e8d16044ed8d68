"""train/data.py on real tar shards written in tmp dirs: decode, crops, seeding, skips, latents."""

from __future__ import annotations

import io
import itertools
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tar
from PIL import Image

from distill.conditioning import Conditioning
from train.data import (
    LatentBatch,
    expand_urls,
    image_loader,
    image_loader_single_pass,
    latent_loader,
    write_latent_shards,
)
from train.errors import DataError


def png_bytes(h: int, w: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def image_shard(path: Path, keys: list[str], h: int = 20, w: int = 30) -> Path:
    members = {}
    for i, key in enumerate(keys):
        members[f"{key}.png"] = png_bytes(h + i, w, seed=i)
        members[f"{key}.txt"] = f"caption of {key}".encode()
        members[f"{key}.json"] = f'{{"width": {w}, "height": {h + i}}}'.encode()
    return write_tar(path, members)


@pytest.fixture()
def four_shards(tmp_path: Path) -> str:
    for s in range(4):
        image_shard(tmp_path / f"train-{s:06d}.tar", [f"{s}{i:03d}" for i in range(8)])
    return str(tmp_path / "train-{000000..000003}.tar")


def keys_of(stream, n_batches: int) -> list[str]:
    return [k for b in itertools.islice(iter(stream), n_batches) for k in b.keys]


def test_single_pass_reads_every_sample_with_shapes_and_range(tmp_path):
    image_shard(tmp_path / "a.tar", [f"a{i}" for i in range(5)])
    image_shard(tmp_path / "b.tar", [f"b{i}" for i in range(5)], h=33, w=17)
    stream = image_loader_single_pass([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")],
                                      batch_size=3, resolution=16, rank=0, world_size=1)
    batches = list(stream)
    assert [len(b.keys) for b in batches] == [3, 3, 3, 1]
    keys = [k for b in batches for k in b.keys]
    assert keys == [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(5)]
    for b in batches:
        assert b.pixels.shape == (len(b.keys), 3, 16, 16) and b.pixels.dtype == torch.float32
        assert b.pixels.min() >= -1 and b.pixels.max() <= 1
        assert b.pixels.min() < -0.9 and b.pixels.max() > 0.9  # really spans the range
        assert b.time_ids.shape == (len(b.keys), 6)
        assert b.captions == [f"caption of {k}" for k in b.keys]
    assert stream.skip_counts == {}


def test_brace_pattern_and_list_expand_to_the_same_shards(four_shards, tmp_path):
    urls = expand_urls(four_shards)
    assert urls == [str(tmp_path / f"train-{s:06d}.tar") for s in range(4)]
    from_pattern = keys_of(image_loader_single_pass(four_shards, batch_size=8, resolution=8,
                                                    rank=0, world_size=1), 100)
    from_list = keys_of(image_loader_single_pass(urls, batch_size=8, resolution=8,
                                                 rank=0, world_size=1), 100)
    assert from_pattern == from_list and len(from_pattern) == 32
    with pytest.raises(DataError, match="no shards given"):
        expand_urls([])


@pytest.mark.parametrize("h, w, expected", [
    (40, 24, (40, 24, 4, 0, 12, 12)),  # tall: resized to 20x12, crop 4 rows off the top
    (24, 40, (24, 40, 0, 4, 12, 12)),  # wide: resized to 12x20, crop 4 columns off the left
])
def test_centre_crop_time_ids_are_height_first(tmp_path, h, w, expected):
    # Top 16 rows (or left 16 columns) black, the rest white, so the crop's content shows
    # which axis was cropped: after the 2x downscale the crop holds 4 black rows/columns of 12.
    pixels = np.full((h, w, 3), 255, dtype=np.uint8)
    if h > w:
        pixels[:16] = 0
    else:
        pixels[:, :16] = 0
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    write_tar(tmp_path / "s.tar", {"k.png": buf.getvalue(), "k.txt": b"a digit"})
    batch = next(iter(image_loader_single_pass(str(tmp_path / "s.tar"), batch_size=1,
                                               resolution=12, rank=0, world_size=1)))
    assert batch.time_ids[0].tolist() == list(expected)
    image = batch.pixels[0].mean(0)  # (12, 12)
    profile = image.mean(1) if h > w else image.mean(0)  # along the cropped axis
    assert (profile < 0).sum() in (4, 5)  # bicubic may smear one row at the edge
    assert profile[0] < -0.9 and profile[-1] > 0.9


def test_original_size_from_image_or_img2dataset_json(tmp_path):
    write_tar(tmp_path / "s.tar", {
        "k.png": png_bytes(20, 32), "k.txt": b"x",
        "k.json": b'{"width": 32, "height": 20, "original_width": 300, "original_height": 200}'})

    def time_ids(**kw):
        return next(iter(image_loader_single_pass(str(tmp_path / "s.tar"), batch_size=1,
                                                  resolution=10, rank=0, world_size=1,
                                                  **kw))).time_ids[0].tolist()

    assert time_ids() == [20, 32, 0, 3, 10, 10]
    assert time_ids(original_size="metadata") == [200, 300, 0, 3, 10, 10]
    with pytest.raises(ValueError, match="original_size"):
        time_ids(original_size="json")


def test_random_crop_is_seeded_and_in_bounds(tmp_path):
    image_shard(tmp_path / "s.tar", [f"k{i}" for i in range(16)], h=16, w=48)

    def crops(seed):
        b = next(iter(image_loader_single_pass(str(tmp_path / "s.tar"), batch_size=16,
                                               resolution=16, rank=0, world_size=1,
                                               center_crop=False, seed=seed)))
        return b.time_ids

    a, again, other = crops(0), crops(0), crops(1)
    assert torch.equal(a, again) and not torch.equal(a, other)
    left = a[:, 3]
    assert (a[:, 2] == 0).all() and (left >= 0).all() and (left <= 32).all()
    assert len(set(left.tolist())) > 3


def test_resampled_order_depends_on_seed_rank_and_resume_step(four_shards):
    def order(**kw):
        args = dict(seed=0, rank=0, world_size=2, resume_step=0) | kw
        return keys_of(image_loader(four_shards, batch_size=4, resolution=8,
                                    shuffle_buffer=16, **args), 12)

    base = order()
    assert len(base) == 48  # more than the 16 samples of this rank's 2 shards: it resamples
    assert order() == base
    assert order(rank=1) != base
    assert order(resume_step=100) != base
    assert order(seed=1) != base
    # world_size=2 splits the 4 shards: rank 0 reads shards 0 and 2, rank 1 shards 1 and 3.
    assert {k[0] for k in base} == {"0", "2"}
    assert {k[0] for k in order(rank=1)} == {"1", "3"}
    with pytest.raises(ValueError):
        order(rank=2)


def test_single_pass_splits_across_ranks_without_overlap(four_shards):
    per_rank = [keys_of(image_loader_single_pass(four_shards, batch_size=5, resolution=8,
                                                 rank=r, world_size=2), 100) for r in (0, 1)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(per_rank[0]) + len(per_rank[1]) == 32


def bad_shard(path: Path, tag: str) -> Path:
    good = png_bytes(12, 12)
    return write_tar(path, {
        f"{tag}good1.png": good, f"{tag}good1.txt": b"fine",
        f"{tag}trunc.png": good[: len(good) // 2], f"{tag}trunc.txt": b"truncated png",
        f"{tag}garbage.png": b"this is not an image", f"{tag}garbage.txt": b"undecodable",
        f"{tag}nocap.png": good,
        f"{tag}emptycap.png": good, f"{tag}emptycap.txt": b"  \n",
        f"{tag}noimage.txt": b"caption without image",
        f"{tag}good2.png": good, f"{tag}good2.txt": b"fine too",
    })


EXPECTED_SKIPS = {"corrupt_image": 1, "undecodable_image": 1, "missing_caption": 1,
                  "empty_caption": 1, "missing_image": 1}


def test_bad_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    bad_shard(tmp_path / "bad.tar", "x")
    stream = image_loader_single_pass(str(tmp_path / "bad.tar"), batch_size=8, resolution=8,
                                      rank=0, world_size=1)
    with caplog.at_level(logging.WARNING, logger="train.data"):
        keys = keys_of(stream, 10)
    assert keys == ["xgood1", "xgood2"]
    assert stream.skip_counts == EXPECTED_SKIPS
    for key in ("xtrunc", "xgarbage", "xnocap", "xemptycap", "xnoimage"):
        assert any(key in r.getMessage() for r in caplog.records), key


def test_corrupt_and_missing_shards_are_skipped(tmp_path):
    image_shard(tmp_path / "ok.tar", ["ok0", "ok1"])
    data = (image_shard(tmp_path / "cut.tar", [f"c{i}" for i in range(6)], h=64, w=64)
            .read_bytes())
    (tmp_path / "cut.tar").write_bytes(data[: len(data) * 2 // 3])  # torn mid-member
    urls = [str(tmp_path / "cut.tar"), str(tmp_path / "missing.tar"), str(tmp_path / "ok.tar")]
    stream = image_loader_single_pass(urls, batch_size=4, resolution=8, rank=0, world_size=1)
    keys = keys_of(stream, 10)
    assert keys[-2:] == ["ok0", "ok1"]
    assert set(keys[:-2]) < {f"c{i}" for i in range(6)}  # what preceded the tear survives
    assert stream.skip_counts == {"corrupt_tar": 1, "unreadable_shard": 1}


def test_skip_counts_are_summed_over_dataloader_workers(tmp_path):
    urls = [str(bad_shard(tmp_path / f"bad{i}.tar", f"w{i}")) for i in range(2)]
    stream = image_loader_single_pass(urls, batch_size=1, resolution=8, rank=0, world_size=1,
                                      num_workers=2)
    batches = list(stream)
    assert {b.worker for b in batches} == {0, 1}
    assert sorted(k for b in batches for k in b.keys) == ["w0good1", "w0good2",
                                                         "w1good1", "w1good2"]
    assert stream.skip_counts == {reason: 2 * n for reason, n in EXPECTED_SKIPS.items()}


def test_resampled_stream_of_only_broken_shards_raises(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"\0" * 10)
    stream = image_loader(str(tmp_path / "junk.tar"), batch_size=1, resolution=8, seed=0,
                          rank=0, world_size=1, resume_step=0)
    with pytest.raises(DataError, match="held no sample"):
        next(iter(stream))
    write_tar(tmp_path / "uncaptioned.tar", {f"k{i}.png": png_bytes(8, 8) for i in range(50)})
    stream = image_loader(str(tmp_path / "uncaptioned.tar"), batch_size=1, resolution=8,
                          seed=0, rank=0, world_size=1, resume_step=0, shuffle_buffer=10)
    with pytest.raises(DataError, match="unusable"):
        next(iter(stream))


def test_latent_shards_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    n = 10
    latents = torch.randn(n, 4, 8, 8, generator=g)
    cond = Conditioning(torch.randn(n, 7, 32, generator=g), torch.randn(n, 16, generator=g),
                        torch.tensor([[32.0, 24, 1, 0, 16, 16]]).repeat(n, 1))
    keys = [f"{i:05d}" for i in range(n)]
    batches = [LatentBatch(latents[i:i + 5], cond.index(slice(i, i + 5)),
                           [f"digit {k}" for k in keys[i:i + 5]], keys[i:i + 5], 0, {})
               for i in (0, 5)]
    written = write_latent_shards(batches, tmp_path / "lat", samples_per_shard=4)
    assert [p.name for p in written] == [f"latents-{i:06d}.tar" for i in range(3)]
    with tarfile.open(written[0]) as tar:
        assert sorted(tar.getnames())[:5] == ["00000.latents.npy", "00000.pooled.npy",
                                              "00000.prompt_embeds.npy", "00000.time_ids.npy",
                                              "00000.txt"]

    stream = latent_loader(str(tmp_path / "lat" / "latents-{000000..000002}.tar"),
                           batch_size=4, seed=0, rank=0, world_size=1, resume_step=0,
                           shuffle_buffer=8)
    seen = {}
    for batch in itertools.islice(iter(stream), 10):
        assert batch.latents.dtype == torch.float32 and batch.latents.shape[1:] == (4, 8, 8)
        for j, key in enumerate(batch.keys):
            seen[key] = (batch.latents[j], batch.cond.index(j), batch.captions[j])
    assert sorted(seen) == keys
    for i, key in enumerate(keys):
        lat, c, caption = seen[key]
        assert torch.equal(lat, latents[i]) and caption == f"digit {key}"
        assert torch.equal(c.prompt_embeds, cond.prompt_embeds[i])
        assert torch.equal(c.pooled_embeds, cond.pooled_embeds[i])
        assert torch.equal(c.time_ids, cond.time_ids[i])


def test_latent_loader_skips_samples_missing_arrays(tmp_path):
    arr = io.BytesIO()
    np.save(arr, np.zeros((4, 8, 8), np.float32), allow_pickle=False)
    write_tar(tmp_path / "l.tar", {"a.latents.npy": arr.getvalue(), "a.txt": b"incomplete"})
    write_latent_shards([LatentBatch(torch.zeros(1, 4, 8, 8),
                                     Conditioning(torch.zeros(1, 7, 32), torch.zeros(1, 16),
                                                  torch.zeros(1, 6)), ["ok"], ["b"], 0, {})],
                        tmp_path, samples_per_shard=10)
    stream = latent_loader([str(tmp_path / "l.tar"), str(tmp_path / "latents-000000.tar")],
                           batch_size=2, seed=0, rank=0, world_size=1, resume_step=0)
    keys = keys_of(stream, 5)
    assert keys == ["b"] * 10
    assert stream.skip_counts.get("missing_field", 0) >= 1
