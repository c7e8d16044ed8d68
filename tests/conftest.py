"""Shared test set-up.

One intra-op thread: the models in tests are tiny, where thread start-up costs more than it
saves, and results are bit-reproducible run to run. Subprocesses inherit it through the
environment.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory) -> Path:
    """A cache root holding the tiny digits model and the digits shards, built once per session
    (or reused from $DISTILL_TEST_CACHE, to keep repeated local runs fast)."""
    from train.digits_data import ensure_digits_shards
    from train.digits_model import ensure_digits_model

    root = Path(os.environ.get("DISTILL_TEST_CACHE") or tmp_path_factory.mktemp("digits_cache"))
    ensure_digits_model(root, "tiny")
    ensure_digits_shards(root)
    return root
