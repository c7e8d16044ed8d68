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
