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
OPT_IN_MARKS = ("slow", "gpu")  # run only when the -m expression names them


def pytest_collection_modifyitems(config, items):
    """Skip slow and gpu tests unless `-m` mentions them. (An `-m` in addopts would be replaced
    by the user's own `-m "not e2e"`, and the slow tests would run in the fast command.)"""
    expression = config.getoption("markexpr") or ""
    for mark in OPT_IN_MARKS:
        if mark in expression:
            continue
        skip = pytest.mark.skip(reason=f"{mark} test: run with -m {mark}")
        for item in items:
            if mark in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory) -> Path:
    """A cache root holding the tiny digits model and the digits shards, built once per session
    (or reused from $DISTILL_TEST_CACHE, to keep repeated local runs fast)."""
    # Imported here, not at the top: the digits package loads diffusers and transformers,
    # which tests that never ask for this fixture (distill/, discriminator/) need not pay for.
    from train.digits import ensure_digits_model, ensure_digits_shards

    root = Path(os.environ.get("DISTILL_TEST_CACHE") or tmp_path_factory.mktemp("digits_cache"))
    ensure_digits_model(root, "tiny")
    ensure_digits_shards(root)
    return root


@pytest.fixture(scope="session")
def digits_dir(digits_cache) -> Path:
    """The tiny digits model folder of the session's shared cache."""
    from train.digits.builder import ensure_digits_model

    return Path(ensure_digits_model(digits_cache, "tiny"))


FOUR_STEP, ONE_STEP_X0 = 2, 4  # stages of configs/tiny.yaml


def export_tiny_finals(root: Path, digits_dir: Path, overrides: list[str], origin: str):
    """configs/tiny.yaml's 4-step stage as a LoRA-track final (the digits UNet + a random LoRA)
    and its 1-step stage as an x0 final (the plain UNet), both exported into root/export.
    Returns the config. No training runs: exports only need finals on disk."""
    import torch
    from diffusers import UNet2DConditionModel

    from distill.lora import add_lora
    from train.config import config_to_yaml, load_config
    from train.export import export_stage
    from train.models import save_student

    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      [f"output_dir={root}", f"model.cache_dir={digits_dir.parent}", *overrides])
    (root / "config.yaml").write_text(config_to_yaml(cfg))
    for stage, prediction_type in ((FOUR_STEP, "epsilon"), (ONE_STEP_X0, "sample")):
        unet = UNet2DConditionModel.from_pretrained(digits_dir, subfolder="unet")
        if stage == FOUR_STEP:
            add_lora(unet, cfg.student.lora_rank, cfg.student.lora_alpha)
            with torch.no_grad():
                for name, p in unet.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.01)
        final = root / "stages" / f"{cfg.stages[stage].student_steps}step" / "final"
        save_student(unet, prediction_type, final, origin=origin)
        export_stage(root, cfg, stage)
    return cfg


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    """A tar shard holding `members` (name → bytes), as webdataset reads them."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# A two-stage recipe: an MSE stage, then an adversarial LoRA → merge → full stage; long enough
# in its first adversarial phase (8 steps) to be interrupted inside it.
SHORT_RECIPE = """stages:
  - teacher_steps: 32
    student_steps: 8
    guidance_scale: 3.0
    phases:
      - {kind: mse, steps: 2, form: full}
  - teacher_steps: 8
    student_steps: 2
    phases:
      - {kind: adv_conditional, steps: 8, form: lora}
      - {kind: merge, steps: 0, form: lora}
      - {kind: adv_unconditional, steps: 2, form: full}
"""


def write_short_config(directory: Path, adversarial_steps: int = 8) -> Path:
    """configs/tiny.yaml with its recipe replaced by SHORT_RECIPE."""
    tiny = (ROOT / "configs/tiny.yaml").read_text()
    recipe = SHORT_RECIPE.replace("steps: 8, form: lora", f"steps: {adversarial_steps}, form: lora")
    path = directory / "short.yaml"
    path.write_text(tiny[: tiny.index("stages:")] + recipe + tiny[tiny.index("student:"):])
    return path


def subprocess_env(**extra: str) -> dict:
    """Environment for CLI subprocesses: offline wandb, one thread, unbuffered output."""
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", **extra)
    env.pop("WANDB_API_KEY", None)
    return env


def load_script(name: str):
    """scripts/<name>.py imported as the module `name` (the bench scripts are not a package);
    registered in sys.modules because dataclasses look their module up there."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
