"""Every bad input a one-line error: `error: <what> (<where>): <what to do>`, exit status 2, no
traceback (unless --debug or LIGHTNING_DEBUG=1), for each CLI.

Most cases run the CLIs' own `main` in this process through the same `run_cli` their
`__main__` uses (the heavy imports are paid once); the subprocess tests check that wiring.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import subprocess_env
from faults import empty, garble, garble_header, one_line_error, reference_run, truncate
from safetensors.torch import load_file, save_file

import train.loop
from train.__main__ import main as train_main
from train.digits.builder import ensure_digits_model
from train.digits.evaluate import main as evaluate_main
from train.errors import DEBUG_ENV, run_cli
from train.export import main as export_main
from train.generate import main as generate_main
from train.lock import RunLock
from train.sweep import main as sweep_main

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs/tiny.yaml")


def _cli(main, argv, capsys) -> tuple[int, str]:
    """Run a CLI main the way its __main__ does; (exit status, its one error line)."""
    capsys.readouterr()
    status = run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    return status, one_line_error(err) if status else err


def _train(tmp_path, cache, *overrides) -> list[str]:
    return [TINY, f"output_dir={tmp_path / 'run'}", f"model.cache_dir={cache}", *overrides]


@pytest.fixture(scope="module")
def digits_dir(digits_cache) -> Path:
    return Path(ensure_digits_model(digits_cache, "tiny"))


@pytest.fixture(scope="module")
def sd15_dir(digits_dir, tmp_path_factory) -> Path:
    """The tiny digits model made SD1.5-shaped: one text encoder, no text_time embedding."""
    path = tmp_path_factory.mktemp("sd15") / "model"
    shutil.copytree(digits_dir, path)
    config = json.loads((path / "unet/config.json").read_text())
    config["addition_embed_type"] = None
    (path / "unet/config.json").write_text(json.dumps(config))
    shutil.rmtree(path / "text_encoder_2")
    shutil.rmtree(path / "tokenizer_2")
    return path


# ----------------------------------------------------------------------------- train: config


@pytest.mark.parametrize("override, expected", [
    ("optim.lr_mse=nan", "error: optim.lr_mse: must be a finite number, got nan"),
    ("optim.lr_adv_full=inf", "error: optim.lr_adv_full: must be a finite number, got inf"),
    ("optim.lr_adv_lora=3", "error: optim.lr_adv_lora: a learning rate must be in (0, 1], got 3"),
    ("optim.betas_adv=[0.0,1.5]", "error: optim.betas_adv: need two values in [0, 1)"),
    ("discriminator.renoise_weights=[1,1,nan,1]", "error: discriminator.renoise_weights: must be a finite number"),
    ("stages.0.guidance_scale=-1", "error: stages.0.guidance_scale: must be a finite number in [0, 100]"),
    ("stages.1.phases.0.steps=-2", "error: stages.1.phases.0.steps: must be >= 0"),
    ("stages.0.phases.0.lr=nan", "error: stages.0.phases.0.lr: a learning rate must be in (0, 1]"),
    ("data.resolution=36", "error: data.resolution: must be a multiple of 8"),
    ("student.lora_alpha=nan", "error: student.lora_alpha: must be a finite number"),
])
def test_config_numbers_are_checked_by_key(override, expected, tmp_path, digits_cache, capsys):
    status, line = _cli(train_main, _train(tmp_path, digits_cache, override), capsys)
    assert status == 2 and line.startswith(expected), line
    assert "(" + TINY + " with overrides): fix it in the config file" in line
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_unreadable_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n  - {kind: mse\n")
    status, line = _cli(train_main, [str(bad)], capsys)
    assert status == 2 and line.startswith("error: not a readable YAML file") and str(bad) in line


# ----------------------------------------------------------------------------- train: paths, base, lock


@pytest.mark.parametrize("where, expected", [
    ("under_a_file", "a parent is a file, not a folder"),
    ("a_file", "a file is in the way"),
    ("proc", "No such file or directory"),
])
def test_unusable_output_dir(where, expected, tmp_path, digits_cache, capsys):
    (tmp_path / "file").write_text("x")
    out = {"under_a_file": tmp_path / "file" / "run", "a_file": tmp_path / "file",
           "proc": Path("/proc/lightning-distill/run")}[where]
    status, line = _cli(train_main, [TINY, f"output_dir={out}", f"model.cache_dir={digits_cache}"], capsys)
    assert status == 2 and f"error: output_dir cannot be used as a folder: {expected} ({out})" in line


def test_sd15_base_is_named_as_such(sd15_dir, tmp_path, digits_cache, capsys):
    status, line = _cli(train_main, _train(tmp_path, digits_cache, f"model.base={sd15_dir}",
                                           "validation.prompts=[a]"), capsys)
    assert status == 2
    assert line.startswith("error: model.base: SD1.5-style UNet (no text_time embedding); this "
                           "release supports SDXL-style UNets"), line
    assert f"({sd15_dir})" in line


@pytest.mark.parametrize("damage, expected", [
    ("addition_embed_type=text", "error: model.base: UNet with addition_embed_type='text'; this release "
                                 "supports SDXL-style UNets (two text encoders, text_time embedding)"),
    ("no text_encoder", "error: model.base: no text_encoder/config.json (an SDXL-style folder has unet, vae, "
                        "text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler)"),
])
def test_base_without_text_time_or_a_text_encoder_is_refused_before_loading(
        damage, expected, digits_dir, tmp_path, digits_cache, capsys, monkeypatch):
    def no_model_loads(*args, **kwargs):
        raise AssertionError("a model was loaded before the base layout was checked")

    monkeypatch.setattr(train.loop, "load_base", no_model_loads)
    base = tmp_path / "base"
    shutil.copytree(digits_dir, base)
    if damage.startswith("addition_embed_type"):
        config = json.loads((base / "unet/config.json").read_text())
        config["addition_embed_type"] = "text"
        (base / "unet/config.json").write_text(json.dumps(config))
    else:
        shutil.rmtree(base / "text_encoder")
    status, line = _cli(train_main, _train(tmp_path, digits_cache, f"model.base={base}",
                                           "validation.prompts=[a]"), capsys)
    assert status == 2 and line.startswith(expected) and f"({base})" in line, line


def test_base_without_a_second_text_encoder_or_missing(digits_dir, tmp_path, digits_cache, capsys):
    half = tmp_path / "half"
    shutil.copytree(digits_dir, half)
    shutil.rmtree(half / "text_encoder_2")
    status, line = _cli(train_main, _train(tmp_path, digits_cache, f"model.base={half}",
                                           "validation.prompts=[a]"), capsys)
    assert status == 2 and "error: model.base: no text_encoder_2/config.json" in line
    status, line = _cli(train_main, _train(tmp_path, digits_cache, f"model.base={tmp_path / 'nope'}",
                                           "validation.prompts=[a]"), capsys)
    assert status == 2 and f"error: model.base: no such folder ({tmp_path / 'nope'})" in line


def test_shards_matching_no_file(tmp_path, digits_cache, capsys):
    status, line = _cli(train_main, _train(tmp_path, digits_cache,
                                           f"data.train_shards={tmp_path}/none-{{000..009}}.tar"), capsys)
    assert status == 2 and line.startswith("error: no shard file exists"), line
    assert "check data.train_shards" in line


def _hold_lock(lock_file: Path) -> subprocess.Popen:
    """Another process holding the run directory's lock, as a training run does."""
    code = ("import sys, time; from train.lock import RunLock; RunLock.acquire(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock_file)], cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_on_one_output_dir_is_refused_and_a_dead_runs_lock_is_not(tmp_path, digits_cache, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = _hold_lock(run / "run.lock")
    try:
        status, line = _cli(train_main, _train(tmp_path, digits_cache), capsys)
        assert status == 2
        assert line.startswith("error: another run is training into this output_dir (PID "
                               f"{holder.pid} on host {os.uname().nodename}"), line
        assert not (run / "config.yaml").exists()  # the running run's config is untouched
    finally:
        os.killpg(holder.pid, 9)
        holder.wait()
    lock = RunLock.acquire(run / "run.lock")  # kill -9 left the file; the lock went with the process
    try:
        assert json.loads((run / "run.lock").read_text())["pid"] == os.getpid()
    finally:
        lock.release()


# ----------------------------------------------------------------------------- generate, export, sweep, evaluate


@pytest.fixture(scope="module")
def reference(digits_cache, tmp_path_factory):
    return reference_run(digits_cache, tmp_path_factory)


DAMAGES = {"truncated": truncate, "emptied": empty, "garbled": garble, "garbled_header": garble_header}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_generate_refuses_a_damaged_export(reference, digits_dir, tmp_path, capsys, damage):
    export = tmp_path / "export"
    shutil.copytree(reference.run / "export", export)
    path = export / "tiny_lightning_2step_unet.safetensors"
    DAMAGES[damage](path)
    out = tmp_path / "grid.png"
    status, line = _cli(generate_main, ["--base", str(digits_dir), "--export", str(path), "--prompt", "a",
                                        "--out", str(out)], capsys)
    assert status == 2 and line.startswith("error: damaged export:"), line
    assert f"({path})" in line and "write it again" in line and not out.exists()


def test_generate_refuses_nan_weights_without_a_manifest_and_a_missing_file(reference, digits_dir, tmp_path, capsys):
    """A file copied on its own (no export/manifest.json beside it) with a NaN in it."""
    tensors = load_file(reference.run / "export/tiny_lightning_2step_unet.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    path = tmp_path / "copied.safetensors"
    from safetensors import safe_open
    with safe_open(str(reference.run / "export/tiny_lightning_2step_unet.safetensors"), "pt") as f:
        save_file(tensors, path, metadata=f.metadata())
    out = tmp_path / "grid.png"
    status, line = _cli(generate_main, ["--base", str(digits_dir), "--export", str(path), "--prompt", "a",
                                        "--out", str(out)], capsys)
    assert status == 2 and "non-finite weights (NaN or Inf) in 1 tensor(s): " + name in line
    assert not out.exists()
    status, line = _cli(generate_main, ["--base", str(digits_dir), "--export", str(tmp_path / "no.safetensors"),
                                        "--prompt", "a"], capsys)
    assert status == 2 and line.startswith("error: export file not found")


def test_export_cli_user_errors(reference, tmp_path, capsys):
    status, line = _cli(export_main, [str(tmp_path)], capsys)
    assert status == 2 and line == f"error: not a run directory (no config.yaml) ({tmp_path}): pass the output_dir of a training run"
    status, line = _cli(export_main, [str(reference.run), "--stages", "16"], capsys)
    assert status == 2 and line.startswith("error: no [16]-step stage in this run's recipe (--stages)")


def test_sweep_cli_user_errors(tmp_path, capsys):
    bad = tmp_path / "sweep.yaml"
    bad.write_text("base: configs/tiny.yaml\nroot: x\ngird: {}\n")
    status, line = _cli(sweep_main, [str(bad), "--dry-run"], capsys)
    assert status == 2 and "error: gird: unknown sweep key" in line and "did you mean 'grid'?" in line
    bad.write_text("base: [unclosed\n")
    status, line = _cli(sweep_main, [str(bad), "--dry-run"], capsys)
    assert status == 2 and line.startswith("error: not a readable YAML file")


def test_evaluate_cli_refuses_an_sd15_folder(sd15_dir, capsys):
    status, line = _cli(evaluate_main, ["--model", str(sd15_dir), "--steps", "1"], capsys)
    assert status == 2 and "SD1.5-style UNet (no text_time embedding)" in line


def test_scripts_user_errors(sd15_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import make_digits_shards
    import precompute_latents

    status, line = _cli(precompute_latents.main, ["--model", str(sd15_dir), "--shards", "x.tar",
                                                  "--out", str(tmp_path / "latents")], capsys)
    assert status == 2 and "SD1.5-style UNet (no text_time embedding)" in line
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(sys, "argv", ["make_digits_shards.py", "--out", str(tmp_path / "file" / "shards")])
    status, line = _cli(lambda _: make_digits_shards.main(), None, capsys)
    assert status == 2 and line.startswith("error: --out cannot be used as a folder: a parent is a file")


def test_debug_adds_the_traceback(tmp_path, capsys):
    before = os.environ.pop(DEBUG_ENV, None)
    try:
        capsys.readouterr()
        assert run_cli(lambda: train_main([TINY, "optim.lr_mse=nan", "--debug"])) == 2
        err = capsys.readouterr().err
        assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: optim.lr_mse")
        assert os.environ[DEBUG_ENV] == "1"  # --debug sets it, for subprocesses (sweep runs)
        del os.environ[DEBUG_ENV]
        assert run_cli(lambda: train_main([TINY, "optim.lr_mse=nan"])) == 2
        assert "Traceback" not in capsys.readouterr().err
        os.environ[DEBUG_ENV] = "1"  # the environment variable alone does the same
        assert run_cli(lambda: train_main([TINY, "optim.lr_mse=nan"])) == 2
        assert "Traceback" in capsys.readouterr().err
    finally:
        os.environ.pop(DEBUG_ENV, None)
        if before is not None:
            os.environ[DEBUG_ENV] = before


# ----------------------------------------------------------------------------- the real entry points


@pytest.mark.e2e
def test_train_entry_point_prints_one_line_and_exits_2(tmp_path):
    start = time.time()
    result = subprocess.run([sys.executable, "-m", "train", TINY, "optim.lr_mse=nan"], cwd=ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert one_line_error(result.stderr).startswith("error: optim.lr_mse: must be a finite number")
    assert time.time() - start < 120  # refused before the heavy imports


@pytest.mark.e2e
@pytest.mark.slow  # ~20 s of diffusers imports for one line; main() is tested in-process above
def test_generate_entry_point_refuses_an_empty_file(digits_dir, tmp_path):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    result = subprocess.run([sys.executable, "-m", "train.generate", "--base", str(digits_dir), "--export",
                             str(path), "--prompt", "a", "--out", str(tmp_path / "g.png")], cwd=ROOT,
                            env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert one_line_error(result.stderr).startswith("error: damaged export: empty.safetensors: not a "
                                                    "readable safetensors file")
