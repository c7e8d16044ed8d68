"""Sweeps: expansion, names and validation in process; the CLI's --dry-run and --commands in a
subprocess; a short two-run sweep on the tiny digits model trained for real (results tables,
skipping finished runs on rerun, a failing run reported while the sweep goes on, --eval)."""

from __future__ import annotations

import csv
import shlex
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import subprocess_env, write_short_config

from train.bench_runs import run_dir_for
from train.config import load_config
from train.sweep import SweepError, format_value, load_sweep, plot_results, run_names, seed_summary
from train.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]

def _env() -> dict:
    return subprocess_env()


def _sweep_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.sweep", *map(str, args)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


EXAMPLE = """base: configs/tiny.yaml
root: {root}
overrides: {{export.dtype: fp16, optim.lr_mse: 3.0e-4}}
grid:
  discriminator.backbone_trainable: [false, true]
  optim.lr_adv_full: [1.0e-5, 2.0e-5]
runs:
  - {{name: single_head, discriminator.bucket_edges: []}}
  - {{discriminator.bucket_edges: [100, 500], optim.lr_adv_full: 3.0e-5}}
"""


# ----------------------------------------------------------------------------- expansion

@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # base paths in sweep files are relative to the working directory


def test_expansion_grid_and_list_names_and_overrides(tmp_path, in_root):
    sweep = load_sweep(_write(tmp_path / "s.yaml", EXAMPLE.format(root=tmp_path / "sw")))
    names = [r.name for r in sweep.runs]
    assert names == [
        "backbone_trainable-false_lr_adv_full-1e-05", "backbone_trainable-false_lr_adv_full-2e-05",
        "backbone_trainable-true_lr_adv_full-1e-05", "backbone_trainable-true_lr_adv_full-2e-05",
        "single_head", "bucket_edges-100+500_lr_adv_full-3e-05"]
    assert sweep.varying == ["discriminator.backbone_trainable", "optim.lr_adv_full",
                             "discriminator.bucket_edges"]
    by_name = {r.name: r for r in sweep.runs}
    cfg = by_name["backbone_trainable-true_lr_adv_full-2e-05"].config
    assert cfg.discriminator.backbone_trainable is True and cfg.optim.lr_adv_full == 2e-5
    assert cfg.export.dtype == "fp16" and cfg.optim.lr_mse == 3e-4  # common overrides everywhere
    assert cfg.output_dir == str(tmp_path / "sw" / "backbone_trainable-true_lr_adv_full-2e-05")
    single = by_name["single_head"].config
    assert single.discriminator.bucket_edges == [] and single.discriminator.backbone_trainable is False
    assert single.export.dtype == "fp16"
    assert by_name["bucket_edges-100+500_lr_adv_full-3e-05"].config.discriminator.bucket_edges == [100, 500]
    # the args handed to `python -m train` reproduce the same config
    run = by_name["single_head"]
    assert load_config(ROOT / "configs/tiny.yaml", list(run.args)) == run.config
    assert run.args[-1] == f"output_dir={tmp_path / 'sw' / 'single_head'}"


def test_seeds_repeat_every_run_and_name_it_by_seed(tmp_path, in_root):
    text = EXAMPLE.format(root=tmp_path / "sw") + "seeds: [0, 3]\n"
    sweep = load_sweep(_write(tmp_path / "s.yaml", text))
    assert len(sweep.runs) == 12 and sweep.seeds == (0, 3)
    single = [r for r in sweep.runs if r.group == "single_head"]
    assert [r.name for r in single] == ["single_head_seed-0", "single_head_seed-3"]
    assert [r.config.seed for r in single] == [0, 3]
    assert single[1].args[-2:] == ("seed=3", f"output_dir={tmp_path / 'sw' / 'single_head_seed-3'}")
    assert sweep.runs[0].name == "backbone_trainable-false_lr_adv_full-1e-05_seed-0"
    assert "seed" in sweep.varying  # a column of results.md


def test_seed_summary_and_plot_give_mean_and_sd_per_run_group(tmp_path, in_root):
    from PIL import Image

    text = (f"base: configs/tiny.yaml\nroot: {tmp_path / 'root'}\nseeds: [0, 1, 2]\n"
            "runs:\n  - {name: a}\n  - {name: b, discriminator.bucket_edges: []}\n")
    sweep = load_sweep(_write(tmp_path / "s.yaml", text))
    sweep.root.mkdir(parents=True)
    rows = [{"run": f"{group}_seed-{seed}", "stage": f"{steps}step", "digits_fd": fd + seed,
             "prompt_accuracy": 0.9, "precision": 0.8, "recall": 0.5, "diversity": 1.0}
            for group in ("a", "b") for seed in (0, 1, 2) for steps, fd in ((4, 10.0), (1, 20.0))]
    rows.append({"run": "b_seed-2", "stage": "", "digits_fd": None})  # a row with no evaluation
    summary = {(r["run"], r["stage"]): r for r in seed_summary(sweep, rows)}
    assert set(summary) == {("a", "4step"), ("a", "1step"), ("b", "4step"), ("b", "1step")}
    assert summary[("a", "1step")]["seeds"] == 3
    assert summary[("a", "1step")]["digits_fd"] == pytest.approx((21.0, 1.0))  # mean, sample sd
    assert summary[("b", "4step")]["recall"] == pytest.approx((0.5, 0.0))
    image = Image.open(plot_results(sweep, rows)).convert("RGB")
    colours = {c for _, c in image.crop((0, 0, 500, 400)).getcolors(maxcolors=1 << 18)}
    assert {(31, 119, 180), (255, 127, 14)} <= colours and (44, 160, 44) not in colours  # 2 lines, not 6


@pytest.mark.parametrize("path", sorted((ROOT / "configs/sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_sweeps_load(path, in_root):
    sweep = load_sweep(path)
    assert sweep.runs and all(run.config.stages for run in sweep.runs)


def test_ablation_sweep_flips_one_discriminator_choice_per_run_at_two_seeds(in_root):
    sweep = load_sweep(ROOT / "configs/sweeps/digits_ablation.yaml")
    assert sweep.seeds == (0, 1)
    flipped = {run.group: {k: v for k, v in run.overrides.items() if k != "seed"} for run in sweep.runs}
    assert flipped == {"preset": {}, "one_head_set": {"discriminator.bucket_edges": []},
                       "multiscale": {"discriminator.multiscale": True},
                       "trainable_backbone": {"discriminator.backbone_trainable": True}}
    preset = next(run.config.discriminator for run in sweep.runs if run.group == "preset")
    assert preset.bucket_edges and not preset.multiscale and not preset.backbone_trainable
    # the preset cells are bench_quality's `ours` runs at the same seeds (one config hash), so a
    # finished bench run can be linked in instead of trained again
    base = load_config(ROOT / "configs/digits.yaml")
    for run in (run for run in sweep.runs if run.group == "preset"):
        seed = run.overrides["seed"]
        assert run_dir_for("ours", run.config, ROOT) == run_dir_for("ours", replace(base, seed=seed), ROOT)


def test_names_unique_and_safe_when_values_clash():
    safe = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-")
    names = run_names([(None, {"validation.prompts": ["a b"], "model.base": "x/y"}),
                       (None, {"validation.prompts": ["a-b"], "model.base": "x-y"}),
                       (None, {"validation.prompts": ["c"], "model.base": "x-y"})])
    assert len(set(names)) == 3 and all(set(n) <= safe for n in names)
    # the first two slug alike: both get a hash of their overrides appended
    assert names[0].startswith("prompts-a-b_base-x-y-") and names[1].startswith("prompts-a-b_base-x-y-")
    assert names[2] == "prompts-c_base-x-y"
    # keys sharing a last component keep enough of their path to tell them apart; a key with
    # the same value in every run does not appear; a run with nothing varying is "base"
    assert run_names([(None, {"seed": 1, "optim.lr": 1e-4}), (None, {"seed": 1, "other.lr": 1e-4}),
                      (None, {"seed": 1})]) == ["optim.lr-0.0001", "other.lr-0.0001", "base"]
    assert run_names([(None, {"optim.lr": -1.0}), (None, {"optim.lr": 1.0})]) == ["lr--1.0", "lr-1.0"]
    long = run_names([(None, {"validation.prompts": ["x" * 200]}), (None, {})])
    assert len(long[0]) == 100 and long[1] == "base"
    with pytest.raises(SweepError, match="duplicate run names"):
        run_names([("a", {"seed": 1}), ("a", {"seed": 2})])


@pytest.mark.parametrize("value", [True, None, 3, 1e-05, 0.5, [], [1, 2], "digits:tiny", "true",
                                   "a b", "1.5", ["x", "no"]])
def test_format_value_round_trips_through_dotlist(value):
    from omegaconf import OmegaConf

    conf = OmegaConf.create({"v": None})
    conf.merge_with_dotlist([f"v={format_value(value)}"])
    assert OmegaConf.to_container(conf)["v"] == value


@pytest.mark.parametrize("text, expected", [
    ("grid:\n  optim.lr_adv_full: [1.0e-5, -1.0]\n",
     "run 'lr_adv_full--1.0': optim.lr_adv_full: must be > 0"),
    ("runs:\n  - {name: typo, discriminator.bucket_edgez: []}\n",
     "run 'typo': discriminator.bucket_edgez: unknown key"),
    ("runs:\n  - {name: bad, discriminator.loss: hinj}\n", "run 'bad': discriminator.loss: 'hinj' is not one of"),
    ("gird:\n  seed: [1, 2]\n",
     "gird: unknown sweep key; allowed: ['base', 'root', 'overrides', 'grid', 'runs', 'seeds']"),
    ("seeds: [0, 0]\n", "seeds: expected a non-empty list of distinct integers"),
    ("seeds: 3\n", "seeds: expected a non-empty list of distinct integers"),
    ("seeds: [0, 1]\ngrid:\n  seed: [1, 2]\n", "seed: set by the sweep's `seeds` list"),
    ("grid:\n  seed: 3\n", "grid.seed: expected a non-empty list"),
    ("overrides: {output_dir: /x}\n", "output_dir is set by the sweep"),
    ("runs:\n  - {name: 'a/b', seed: 1}\n", "runs.0.name: 'a/b' is not a file-name-safe name"),
])
def test_validation_errors_name_the_run_or_key(tmp_path, in_root, text, expected):
    path = _write(tmp_path / "s.yaml", f"base: configs/tiny.yaml\nroot: {tmp_path}\n{text}")
    with pytest.raises(SweepError) as err:
        load_sweep(path)
    assert expected in str(err.value)


@pytest.mark.e2e
def test_dry_run_and_commands_cli(tmp_path):
    path = _write(tmp_path / "s.yaml", EXAMPLE.format(root="runs/sweeps/example"))
    dry = _sweep_cli(path, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "single_head" in dry.stdout and "runs/sweeps/example/single_head" in dry.stdout
    assert "discriminator.bucket_edges=[100,500] optim.lr_adv_full=3e-05" in dry.stdout
    assert "# 6 runs from configs/tiny.yaml" in dry.stdout
    assert not (ROOT / "runs/sweeps/example").exists()  # nothing ran, nothing written

    plain = _sweep_cli(path, "--commands")
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.strip().splitlines()
    assert len(lines) == 6
    args = shlex.split(lines[4])
    assert args[:4] == ["python", "-m", "train", "configs/tiny.yaml"]
    assert args[4:] == ["export.dtype=fp16", "optim.lr_mse=0.0003", "discriminator.bucket_edges=[]",
                        "output_dir=runs/sweeps/example/single_head"]
    launched = _sweep_cli(path, "--commands", "--launcher", "accelerate launch --multi_gpu --num_processes 8")
    first = shlex.split(launched.stdout.splitlines()[0])
    assert first[:7] == ["accelerate", "launch", "--multi_gpu", "--num_processes", "8", "-m", "train"]

    bad = _sweep_cli(_write(tmp_path / "bad.yaml", "base: configs/tiny.yaml\nroot: x\n"
                            "runs:\n  - {name: r1, optim.lr_mse: -1}\n"), "--dry-run")
    assert bad.returncode == 2 and "run 'r1': optim.lr_mse: must be > 0" in bad.stderr


def test_plot_has_one_line_per_run_on_both_panels(tmp_path, in_root):
    from PIL import Image

    sweep = load_sweep(_write(tmp_path / "s.yaml", EXAMPLE.format(root=tmp_path / "root")))
    sweep.root.mkdir(parents=True)
    no_eval = [{"run": "a", "stage": "8step", "digits_fd": None, "recall": None}]
    assert plot_results(sweep, no_eval) is None and not (sweep.root / "fd_vs_steps.png").exists()
    rows = [{"run": run, "stage": f"{steps}step", "digits_fd": fd, "recall": recall / scale}
            for run, scale in (("a", 1.0), ("b", 2.0))
            for steps, fd, recall in ((8, 10 * scale, 0.9), (4, 20 * scale, 0.8), (1, 40 * scale, 0.5))]
    rows.append({"run": "b", "stage": "", "digits_fd": None, "recall": None})  # a run not started
    path = plot_results(sweep, rows)
    image = Image.open(path).convert("RGB")
    assert image.size == (1000, 400)
    # matplotlib's first two line colours (C0 blue, C1 orange) on each panel: both runs drawn.
    left, right = image.crop((0, 0, 500, 400)), image.crop((500, 0, 1000, 400))
    for panel in (left, right):
        colours = {c for _, c in panel.getcolors(maxcolors=1 << 18)}
        assert {(31, 119, 180), (255, 127, 14)} <= colours


# ----------------------------------------------------------------------------- a real short sweep

@pytest.fixture(scope="module")
def short_sweep(digits_cache, tmp_path_factory):
    """A two-run sweep (single head vs one bucket edge) of a 2-stage recipe, trained once."""
    tmp = tmp_path_factory.mktemp("sweep")
    base = write_short_config(tmp, adversarial_steps=2)
    sweep = _write(tmp / "sweep.yaml", f"base: {base}\nroot: {tmp / 'root'}\n"
                   f"overrides: {{model.cache_dir: {digits_cache}}}\n"
                   "grid:\n  discriminator.bucket_edges: [[], [500]]\n")
    first = _sweep_cli(sweep)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return tmp, sweep, first


def _read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.e2e
def test_short_sweep_runs_both_and_tabulates(short_sweep):
    tmp, _, first = short_sweep
    root = tmp / "root"
    names = ["bucket_edges-empty", "bucket_edges-500"]
    for name in names:
        assert (root / name / "stages/2step/stage.json").is_file()
        assert f"[{name}] " in first.stdout  # the run's output was streamed, prefixed
        assert (root / "logs" / f"{name}.log").stat().st_size > 0
    rows = _read_csv(root / "results.csv")
    assert [(r["run"], r["stage"]) for r in rows] == [(n, s) for n in names for s in ("8step", "2step")]
    for row in rows:
        assert row["status"] == "finished" and row["skipped_steps"] == "0"
        if row["stage"] == "8step":  # the MSE stage
            assert float(row["loss_mse"]) > 0 and row["loss_g"] == ""
        else:  # the adversarial stage
            assert row["loss_mse"] == "" and all(row[k] != "" for k in ("loss_d", "loss_g", "d_acc_real"))
    assert {r["discriminator.bucket_edges"] for r in rows} == {"[]", "[500]"}
    md = (root / "results.md").read_text()
    assert md.count("| bucket_edges-empty | finished | [] |") == 2
    assert "| run | status | discriminator.bucket_edges | stage | loss_mse |" in md


@pytest.mark.e2e
def test_rerun_skips_finished_and_failed_run_is_reported(short_sweep):
    tmp, sweep, _ = short_sweep
    root = tmp / "root"
    before = {n: len(read_metrics(root / n)) for n in ("bucket_edges-empty", "bucket_edges-500")}
    again = _sweep_cli(sweep)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished, skipped") == 2 and "[bucket_edges-" not in again.stdout
    assert {n: len(read_metrics(root / n)) for n in before} == before  # no new metrics rows

    # A run that fails at its first step (config valid; too many non-finite steps, a user error:
    # exit status 2), listed before a finished one: the failure is reported, the sweep goes on
    # to the next run, and exits non-zero at the end.
    text = sweep.read_text().split("grid:")[0] + (
        "runs:\n"
        "  - {name: broken, runtime.fault_nonfinite_steps: [0], runtime.max_nonfinite_steps: 1}\n"
        "  - {name: bucket_edges-500, discriminator.bucket_edges: [500]}\n")
    mixed = _sweep_cli(_write(tmp / "mixed.yaml", text))
    assert mixed.returncode == 1
    assert "broken: FAILED" in mixed.stdout and "bucket_edges-500: finished, skipped" in mixed.stdout
    assert "1 of 2 runs failed: broken" in mixed.stderr
    assert len(read_metrics(root / "bucket_edges-500")) == before["bucket_edges-500"]
    status = {r["run"]: r["status"] for r in _read_csv(root / "results.csv")}
    assert status == {"broken": "failed (exit 2)", "bucket_edges-500": "finished"}


@pytest.mark.e2e
def test_collect_only_with_eval(short_sweep):
    tmp, sweep, _ = short_sweep
    too_few = _sweep_cli(sweep, "--collect-only", "--eval", "--eval-per-digit", "1")
    assert too_few.returncode == 2 and "needs at least 2 images per digit" in too_few.stderr
    result = _sweep_cli(sweep, "--collect-only", "--eval", "--eval-per-digit", "2", "--eval-device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "==> [" not in result.stdout  # nothing ran
    rows = _read_csv(tmp / "root" / "results.csv")
    assert len(rows) == 4
    for row in rows:
        assert float(row["digits_fd"]) >= 0 and 0 <= float(row["prompt_accuracy"]) <= 1
        assert 0 <= float(row["precision"]) <= 1 and 0 <= float(row["recall"]) <= 1
        assert float(row["diversity"]) > 0
    md = (tmp / "root" / "results.md").read_text()
    assert "digits_fd | prompt_accuracy | precision | recall | diversity |" in md
    assert "![digits-FD and recall vs sampling steps](fd_vs_steps.png)" in md
    from PIL import Image

    plot = Image.open(tmp / "root" / "fd_vs_steps.png")
    assert plot.size == (1000, 400)
    # Not a blank canvas: the two panels and their lines put many distinct colours on it.
    assert len(plot.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 20
