"""The digits webdataset shards: img2dataset layout, read back through webdataset."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from train.digits.data import digits_images, digits_split, prompt_for
from train.digits.shards import ensure_digits_shards


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    return ensure_digits_shards(tmp_path_factory.getbasetemp() / "digits-cache")


def _read(urls):
    import webdataset as wds

    return list(wds.WebDataset(urls, shardshuffle=False))


def test_counts_match_the_split(shards):
    split = digits_split()
    assert (shards.num_train, shards.num_eval) == (len(split.train), len(split.eval))
    assert "train-{000000.." in shards.train_urls
    assert shards.eval_urls.endswith("eval-{000000..000000}.tar")  # one held-out shard


def test_samples_read_back_through_webdataset(shards):
    from PIL import Image

    data = digits_images()
    for urls, expected in ((shards.train_urls, digits_split().train),
                           (shards.eval_urls, digits_split().eval)):
        samples = _read(urls)
        assert len(samples) == len(expected)
        keys = [s["__key__"] for s in samples]
        assert len(set(keys)) == len(keys) and all(len(k) == 9 and k.isdigit() for k in keys)
        indices = []
        for s in samples:
            assert {"png", "txt", "json"} <= set(s)
            meta = json.loads(s["json"])
            image = Image.open(io.BytesIO(s["png"]))
            assert image.size == (32, 32) and image.mode == "RGB"
            assert (meta["width"], meta["height"]) == (32, 32) and meta["key"] == s["__key__"]
            assert s["txt"].decode() == prompt_for(meta["label"]) == meta["caption"]
            assert meta["label"] == int(data.labels[meta["index"]])
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
            assert torch.equal(pixels, data.images[meta["index"]])  # lossless
            indices.append(meta["index"])
        assert sorted(indices) == sorted(expected.tolist())  # exactly this split, no leakage


def test_training_shards_mix_digits(shards):
    import webdataset as wds

    first = list(wds.WebDataset(shards.train_urls.split("{")[0] + "000000.tar", shardshuffle=False))
    labels = {json.loads(s["json"])["label"] for s in first}
    assert labels == set(range(10))


def test_ensure_reuses_cache(shards, tmp_path_factory):
    again = ensure_digits_shards(tmp_path_factory.getbasetemp() / "digits-cache")
    assert again == shards
