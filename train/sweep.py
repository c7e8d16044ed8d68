"""Sweeps: one base config × a grid and/or a list of overrides → named runs → one results table.

    python -m train.sweep SWEEP.yaml --dry-run        # the runs: name, overrides, output dir
    python -m train.sweep SWEEP.yaml --commands [--launcher "accelerate launch --multi_gpu --num_processes 8"]
    python -m train.sweep SWEEP.yaml [--eval [--eval-per-digit 20]]   # run here, one after another
    python -m train.sweep SWEEP.yaml --collect-only [--eval]           # only rebuild the tables

With --eval (digits runs), each finished stage's UNet export is scored by the embedded evaluator
(digits-FD, prompt accuracy, precision, recall, within-prompt diversity) and root/fd_vs_steps.png
plots FD and recall against the step count, one line per run.

A sweep file (paths relative to the working directory, as for `python -m train`):

    base: configs/digits.yaml            # the config every run starts from
    root: runs/sweeps/renoise            # run i writes to root/<name_i>; results.md/csv land here
    overrides: {export.dtype: fp32}      # dotted overrides common to every run
    grid:                                # cartesian product: one run per combination
      discriminator.backbone_trainable: [false, true]
      optim.lr_adv_full: [1.0e-5, 2.0e-5]
    runs:                                # extra runs, added to the grid's (not multiplied)
      - {name: single_head, discriminator.bucket_edges: []}
    seeds: [0, 1]                        # optional: every run above once per recipe seed

With `seeds`, each run is repeated per seed (config `seed`: data order, noise, initialisation),
named `<run>_seed-<s>`; results.md then adds, per run and stage, the mean ± sd over the seeds of
the evaluation's columns, and the plot draws the mean with the sd as error bars.

Run names are built from the keys that vary between runs (their shortest unambiguous dotted
suffix) and their values, e.g. `backbone_trainable-true_lr_adv_full-2e-05`. Every run's config
is validated with `load_config` before anything runs. Running is sequential, one `python -m train`
subprocess per run; a run whose last stage has its `stage.json` is finished and skipped, a failed
run is reported and the sweep goes on (exit status 1 at the end). A bad sweep file or run
config ends with one line `error: ...` and exit status 2 before anything runs (`--debug` adds
the traceback).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import itertools
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from distill.phases import did_you_mean, stage_name
from train.config import Config, ConfigError, load_config
from train.embedded import EVAL_METRICS, evaluate_export, is_embedded
from train.errors import UserError, add_debug_flag, run_cli
from train.files import write_text_atomic
from train.tracking import read_metrics

SWEEP_KEYS = ("base", "root", "overrides", "grid", "runs", "seeds")
METRICS = ("loss_mse", "loss_x0", "loss_d", "loss_g", "d_acc_real", "d_acc_fake")
MAX_NAME_CHARS = 100  # longer generated names are cut and suffixed with a hash of the overrides
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./:+-]*")
_YAML_WORDS = {"true", "false", "null", "yes", "no", "on", "off", "y", "n", "~"}


class SweepError(UserError, ValueError):
    """A problem with the sweep file or one of its runs (the run's name is in `what`)."""

    def __init__(self, what: str, where: object = "", todo: str = "fix the sweep file"):
        super().__init__(what, where, todo)


@dataclass(frozen=True)
class SweepRun:
    name: str
    overrides: dict[str, Any]  # this run's own dotted overrides (grid point or list entry)
    args: tuple[str, ...]  # every `key=value` handed to `python -m train`, output_dir last
    output_dir: Path
    config: Config  # the validated config the run will train with
    group: str = ""  # the run's name without its seed suffix (== name in a sweep without seeds)

    @property
    def stage_names(self) -> list[str]:
        return [stage_name(s) for s in self.config.stages]

    def stage_json(self, stage: str) -> Path:
        return self.output_dir / "stages" / stage / "stage.json"

    @property
    def finished(self) -> bool:
        return self.stage_json(self.stage_names[-1]).is_file()


@dataclass(frozen=True)
class Sweep:
    base: str  # the base config as written (kept relative, for commands run elsewhere)
    root: Path
    runs: list[SweepRun]
    varying: list[str]  # dotted keys whose value differs between runs: the table's columns
    seeds: tuple[int, ...] = ()  # the `seeds` key: every run repeated per recipe seed


# ----------------------------------------------------------------------------- values and names

def format_value(value: Any) -> str:
    """A YAML value as the right-hand side of a `dotted.key=value` override (OmegaConf parses
    it back with its YAML loader, so `format_value` round-trips)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}: {format_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)  # a YAML double-quoted string


def _slug(value: Any) -> str:
    """A value as a file-name fragment: lists joined by '+', anything unsafe replaced by '-'."""
    if isinstance(value, list):
        return "+".join(_slug(v) for v in value) if value else "empty"
    if not isinstance(value, str):
        return format_value(value)  # numbers keep their sign: lr--1.0 vs lr-1.0
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", value).strip("-") or "empty"


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Each dotted key's shortest suffix of components that no other key ends with."""
    short = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            label = ".".join(parts[-n:])
            if not any(o != key and (o == label or o.endswith("." + label)) for o in keys):
                break
        short[key] = label
    return short


def _hash(overrides: dict) -> str:
    return hashlib.sha1(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:8]


def _flatten(mapping: Any, where: str, prefix: str = "") -> dict[str, Any]:
    if not isinstance(mapping, dict):
        raise SweepError(f"{where}: expected a mapping of dotted keys to values, got {mapping!r}")
    flat = {}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, where, full + "."))
        else:
            flat[full] = value
    if "output_dir" in flat:
        raise SweepError(f"{where}: output_dir is set by the sweep (root/<run name>); remove it")
    return flat


def _points(raw: dict) -> list[tuple[str | None, dict[str, Any]]]:
    """(explicit name or None, run overrides): the grid's product, then the listed runs."""
    grid = _flatten(raw.get("grid") or {}, "grid")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid.{key}: expected a non-empty list of values, got {values!r}")
    points: list[tuple[str | None, dict]] = []
    if grid:
        points += [(None, dict(zip(grid, combo))) for combo in itertools.product(*grid.values())]
    runs = raw.get("runs") or []
    if not isinstance(runs, list):
        raise SweepError(f"runs: expected a list of mappings, got {runs!r}")
    for i, entry in enumerate(runs):
        entry = dict(entry) if isinstance(entry, dict) else entry
        name = entry.pop("name", None) if isinstance(entry, dict) else None
        if name is not None and not (isinstance(name, str) and _SAFE.fullmatch(name)):
            raise SweepError(f"runs.{i}.name: {name!r} is not a file-name-safe name "
                             "(letters, digits, '.', '_', '+', '-')")
        points.append((name, _flatten(entry, f"runs.{i}")))
    return points or [(None, {})]


def _seeds(raw: dict, points: list[tuple[str | None, dict]]) -> tuple[int, ...]:
    seeds = raw.get("seeds")
    if seeds is None:
        return ()
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) < len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise SweepError(f"seeds: expected a non-empty list of distinct integers >= 0, got {seeds!r}")
    if any("seed" in overrides for _, overrides in points) or "seed" in _flatten(raw.get("overrides") or {}, "overrides"):
        raise SweepError("seed: set by the sweep's `seeds` list; remove it from overrides, grid and runs")
    return tuple(seeds)


def _varying_keys(points: list[tuple[str | None, dict]]) -> list[str]:
    """Keys whose value is not the same in every run (absent = the base's value)."""
    keys = list(dict.fromkeys(k for _, o in points for k in o))
    return [k for k in keys
            if len({json.dumps(o[k], sort_keys=True) if k in o else "<base>" for _, o in points}) > 1]


def run_names(points: list[tuple[str | None, dict]]) -> list[str]:
    """Readable, file-name-safe, unique names (explicit names kept as written)."""
    varying = _varying_keys(points)
    short = _short_keys(varying)
    names = []
    for name, overrides in points:
        if name is None:
            parts = [f"{short[k]}-{_slug(v)}" for k, v in overrides.items() if k in short]
            name = re.sub(r"[^A-Za-z0-9._+-]", "-", "_".join(parts)) or "base"
            if len(name) > MAX_NAME_CHARS:
                name = f"{name[:MAX_NAME_CHARS - 9]}-{_hash(overrides)}"
        names.append(name)
    explicit = [n for (given, _), n in zip(points, names) if given is not None]
    if len(set(explicit)) < len(explicit):
        dup = sorted({n for n in explicit if explicit.count(n) > 1})
        raise SweepError(f"runs: duplicate run names {dup}")
    clashing = {n for n in names if names.count(n) > 1}
    for i, ((given, overrides), name) in enumerate(zip(points, names)):  # disambiguate clashes
        if given is None and name in clashing:
            names[i] = f"{name}-{_hash(overrides)}"
    if len(set(names)) < len(names):
        raise SweepError(f"two runs have the same overrides: {sorted({n for n in names if names.count(n) > 1})}")
    return names


# ----------------------------------------------------------------------------- loading

def load_sweep(path: str | Path) -> Sweep:
    """Parse, expand and validate a sweep file. Raises SweepError naming the key or the run,
    and the file."""
    try:
        return _load_sweep(Path(path))
    except SweepError as err:
        if err.where:
            raise
        raise SweepError(err.what, path, err.todo) from None


def _load_sweep(path: Path) -> Sweep:
    if not path.is_file():
        raise SweepError("sweep file not found", path, "give the path of a sweep YAML file")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    except Exception as err:  # yaml's scanner/parser errors, OmegaConf's, undecodable bytes
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SweepError(f"not a readable YAML file: {first}", path, "fix the YAML syntax") from None
    if not isinstance(raw, dict):
        raise SweepError(f"the top level must be a mapping with keys {list(SWEEP_KEYS)}", path)
    for key in raw:
        if key not in SWEEP_KEYS:
            raise SweepError(f"{key}: unknown sweep key; allowed: {list(SWEEP_KEYS)}"
                             f"{did_you_mean(key, SWEEP_KEYS)}")
    for key in ("base", "root"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise SweepError(f"{key}: required (a path), got {raw.get(key)!r}")
    if not Path(raw["base"]).is_file():
        raise SweepError(f"base: config file not found: {raw['base']} (relative to {Path.cwd()})")
    common = _flatten(raw.get("overrides") or {}, "overrides")
    points = _points(raw)
    seeds = _seeds(raw, points)
    names = run_names(points)
    if seeds:  # each run once per seed; the seed is the last override and the name's suffix
        groups = [group for group in names for _ in seeds]
        names = [f"{group}_seed-{seed}" for group in names for seed in seeds]
        points = [(name, {**overrides, "seed": seed}) for name, overrides in points for seed in seeds]
    else:
        groups = names
    root = Path(raw["root"])
    runs = []
    for name, group, (_, overrides) in zip(names, groups, points):
        output_dir = root / name
        args = tuple(f"{k}={format_value(v)}" for k, v in {**common, **overrides}.items())
        args += (f"output_dir={output_dir}",)
        try:
            cfg = load_config(raw["base"], args)
        except ConfigError as err:
            raise SweepError(f"run {name!r}: {err.what}", err.where, err.todo) from None
        runs.append(SweepRun(name, overrides, args, output_dir, cfg, group))
    return Sweep(raw["base"], root, runs, _varying_keys(points), seeds)


def config_value(cfg: Config, dotted: str) -> Any:
    """The resolved value of `dotted` in a config (list indices as numbers)."""
    value: Any = dataclasses.asdict(cfg)
    for part in dotted.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


# ----------------------------------------------------------------------------- commands and running

def train_command(sweep: Sweep, run: SweepRun, launcher: str | None = None,
                  python: str = "python") -> list[str]:
    """`python -m train BASE k=v ... output_dir=...`, or `LAUNCHER -m train ...`."""
    head = shlex.split(launcher) if launcher else [python]
    return [*head, "-m", "train", sweep.base, *run.args]


def execute(sweep: Sweep, run: SweepRun, launcher: str | None = None) -> int:
    """Train one run in a subprocess; its output is streamed here (prefixed with the run name)
    and kept in root/logs/<name>.log. Returns the exit status."""
    cmd = train_command(sweep, run, launcher, python=sys.executable)
    log_path = sweep.root / "logs" / f"{run.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"==> {run.name}: {shlex.join(cmd)}", flush=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log_path.open("a") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                     text=True, env=env) as proc:
        for line in proc.stdout:
            log.write(line)
            sys.stdout.write(f"[{run.name}] {line}")
            sys.stdout.flush()
    return proc.returncode


def _status_file(sweep: Sweep) -> Path:
    return sweep.root / "status.json"


def _record_status(sweep: Sweep, name: str, returncode: int) -> None:
    status = _read_status(sweep)
    status[name] = {"returncode": returncode, "time": round(time.time(), 3)}
    write_text_atomic(_status_file(sweep), json.dumps(status, indent=2) + "\n")


def _read_status(sweep: Sweep) -> dict:
    """status.json, {} when missing or unreadable (it only says which runs failed last time)."""
    try:
        status = json.loads(_status_file(sweep).read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def run_status(sweep: Sweep, run: SweepRun) -> str:
    """finished | failed (last attempt exited non-zero) | incomplete | pending."""
    if run.finished:
        return "finished"
    recorded = _read_status(sweep).get(run.name)
    if recorded and recorded["returncode"] != 0:
        return f"failed (exit {recorded['returncode']})"
    return "incomplete" if (run.output_dir / "metrics.jsonl").is_file() else "pending"


def run_sweep(sweep: Sweep, launcher: str | None = None) -> list[str]:
    """Train every unfinished run in order; returns the names of the runs that failed."""
    failed = []
    for i, run in enumerate(sweep.runs, 1):
        if run.finished:
            print(f"==> [{i}/{len(sweep.runs)}] {run.name}: finished, skipped", flush=True)
            continue
        print(f"==> [{i}/{len(sweep.runs)}] {run.name}", flush=True)
        returncode = execute(sweep, run, launcher)
        _record_status(sweep, run.name, returncode)
        if returncode != 0:
            failed.append(run.name)
            print(f"==> {run.name}: FAILED (exit {returncode}); log: {sweep.root / 'logs' / run.name}.log",
                  flush=True)
    return failed


# ----------------------------------------------------------------------------- results

def stage_metrics(run: SweepRun) -> dict[str, dict[str, Any]]:
    """Per stage: the last logged value of each METRICS key, and the skipped (non-finite)
    steps summed over the stage's phases (each phase counts its own)."""
    result: dict[str, dict[str, Any]] = {}
    skipped: dict[str, dict[str, int]] = {}
    for row in read_metrics(run.output_dir):
        if "event" in row or "stage" not in row:
            continue
        values = result.setdefault(row["stage"], {})
        values.update({k: row[k] for k in METRICS if k in row})
        if "skipped_steps" in row:
            skipped.setdefault(row["stage"], {})[row.get("phase", "")] = row["skipped_steps"]
    for stage, per_phase in skipped.items():
        result[stage]["skipped_steps"] = sum(per_phase.values())
    return result


def _unet_export(stage_json: Path) -> Path | None:
    exports = json.loads(stage_json.read_text()).get("exports", []) if stage_json.is_file() else []
    run_dir = stage_json.parents[2]  # <run>/stages/<N>step/stage.json; paths are relative to the run
    unets = [run_dir / p for p in exports if re.search(r"_unet(_x0)?\.safetensors$", p)]
    return unets[0] if unets else None


def evaluate_run(sweep: Sweep, run: SweepRun, per_digit: int,
                 device: str = "cpu") -> dict[str, dict[str, float]]:
    """EVAL_METRICS (the embedded evaluator's: digits-FD, prompt accuracy) of each finished
    stage's UNet export at its own step count, rendered through the diffusers pipeline; cached
    in root/eval/<name>.json (keyed by the export's mtime and per_digit). Only for runs whose
    base is an embedded model; other runs get no evaluation."""
    if not is_embedded(run.config.model):
        return {}
    cache_path = sweep.root / "eval" / f"{run.name}.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    results = {}
    for stage in run.stage_names:
        export = _unet_export(run.stage_json(stage))
        if export is None or not export.is_file():
            continue
        key = {"export": str(export), "mtime": export.stat().st_mtime, "per_digit": per_digit,
               "metrics": list(EVAL_METRICS)}  # an evaluator with new metrics scores again
        hit = cache.get(stage)
        if not (hit and all(hit.get(k) == v for k, v in key.items())):
            hit = {**key, **_evaluate_export(run.config, export, per_digit, device)}
            cache[stage] = hit
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            cache_path.write_text(json.dumps(cache, indent=2) + "\n")
        results[stage] = {k: hit[k] for k in EVAL_METRICS}
    return results


def _evaluate_export(cfg: Config, export: Path, per_digit: int, device: str) -> dict[str, float]:
    # diffusers/transformers only here: --dry-run, --commands and --collect-only never load them.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # per-component loading bars, for every export
    transformers_logging.disable_progress_bar()
    metrics = evaluate_export(cfg.model, export, per_digit, device)
    print(f"    eval {export.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)
    return metrics


def result_rows(sweep: Sweep, evals: dict[str, dict] | None = None) -> list[dict[str, Any]]:
    """One row per (run, stage), in recipe order; a run with no metrics yet gets one row."""
    rows = []
    for run in sweep.runs:
        head = {"run": run.name, "status": run_status(sweep, run)}
        head.update({k: format_value(config_value(run.config, k)) for k in sweep.varying})
        metrics = stage_metrics(run)
        run_evals = (evals or {}).get(run.name, {})
        stages = [s for s in run.stage_names if s in metrics or s in run_evals] or [""]
        for stage in stages:
            row = {**head, "stage": stage}
            row.update({k: metrics.get(stage, {}).get(k) for k in (*METRICS, "skipped_steps")})
            if evals is not None:
                row.update({k: run_evals.get(stage, {}).get(k) for k in EVAL_METRICS})
            row["output_dir"] = str(run.output_dir)
            rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


PLOT_FILE = "fd_vs_steps.png"


def _group_of(sweep: Sweep) -> dict[str, str]:
    return {run.name: run.group or run.name for run in sweep.runs}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def seed_summary(sweep: Sweep, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per run group (a run over its seeds) and stage: n seeds evaluated, and the mean and sample
    sd of each evaluation column. [] for a sweep without seeds or rows without evaluations."""
    if not sweep.seeds:
        return []
    group_of = _group_of(sweep)
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("digits_fd") is not None:
            cells.setdefault((group_of.get(row["run"], row["run"]), row["stage"]), []).append(row)
    summary = []
    for (group, stage), members in cells.items():
        out: dict[str, Any] = {"run": group, "stage": stage, "seeds": len(members)}
        for key in EVAL_METRICS:
            values = [m[key] for m in members if m.get(key) is not None]
            if values:
                out[key] = _mean_sd(values)
        summary.append(out)
    return summary


def plot_results(sweep: Sweep, rows: list[dict[str, Any]]) -> Path | None:
    """root/fd_vs_steps.png: digits-FD and recall of each run's stage exports against the
    stage's step count (log axis, fewest steps right, as quality is read along distillation),
    one line per run; with `seeds`, one line per run group at the mean over its seeds, the sd as
    error bars. None when no row has an evaluation."""
    group_of = _group_of(sweep)  # without seeds, a run's group is its own name
    points: dict[str, dict[int, list[tuple[float, float]]]] = {}
    for row in rows:
        match = re.fullmatch(r"(\d+)step", str(row.get("stage", "")))
        if match and row.get("digits_fd") is not None:
            line = group_of.get(row["run"], row["run"])
            points.setdefault(line, {}).setdefault(int(match.group(1)), []).append(
                (row["digits_fd"], row["recall"]))
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on training machines
    import matplotlib.pyplot as plt

    fig, (ax_fd, ax_recall) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for name, by_steps in points.items():
        steps = sorted(by_steps, reverse=True)
        for ax, column in ((ax_fd, 0), (ax_recall, 1)):
            stats = [_mean_sd([v[column] for v in by_steps[n]]) for n in steps]
            ax.errorbar(steps, [m for m, _ in stats], yerr=[sd for _, sd in stats] if sweep.seeds else None,
                        marker="o", capsize=3, label=name)
    all_steps = sorted({n for by_steps in points.values() for n in by_steps}, reverse=True)
    for ax, label in ((ax_fd, "digits-FD (lower is better)"), (ax_recall, "recall (higher is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_steps, [str(s) for s in all_steps])
        ax.invert_xaxis()
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax_recall.set_ylim(0, 1)
    ax_fd.legend(fontsize="small")
    seeds = f", mean ± sd over seeds {list(sweep.seeds)}" if sweep.seeds else ""
    fig.suptitle(f"Sweep {sweep.root.name}: stage exports, guidance off{seeds}")
    path = sweep.root / PLOT_FILE
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_results(sweep: Sweep, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """root/results.csv (every column, full precision), root/results.md (readable) and, when the
    rows carry evaluations, the plot root/fd_vs_steps.png linked from results.md."""
    sweep.root.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    csv_path, md_path = sweep.root / "results.csv", sweep.root / "results.md"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    shown = [c for c in columns if c != "output_dir"]
    lines = [f"# Sweep results: {sweep.root}", "",
             f"Base config `{sweep.base}`; {len(sweep.runs)} runs under `{sweep.root}/<run>`; "
             "per stage, the last logged value of each loss.", "",
             "| " + " | ".join(shown) + " |", "|" + "---|" * len(shown)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in shown) + " |" for row in rows]
    summary = seed_summary(sweep, rows)
    if summary:
        metrics = [k for k in EVAL_METRICS if any(k in row for row in summary)]
        lines += ["", f"Mean ± sd over the seeds {list(sweep.seeds)} (sample sd; n = seeds evaluated):", "",
                  "| run | stage | n | " + " | ".join(metrics) + " |", "|" + "---|" * (3 + len(metrics))]
        lines += [f"| {row['run']} | {row['stage']} | {row['seeds']} | "
                  + " | ".join(f"{row[k][0]:.4g} ± {row[k][1]:.2g}" if k in row else "–" for k in metrics) + " |"
                  for row in summary]
    plot = plot_results(sweep, rows)
    if plot is not None:
        lines += ["", f"![digits-FD and recall vs sampling steps]({plot.name})"]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def collect(sweep: Sweep, eval_per_digit: int | None = None, eval_device: str = "cpu") -> tuple[Path, Path]:
    evals = None
    if eval_per_digit is not None:
        evals = {run.name: evaluate_run(sweep, run, eval_per_digit, eval_device) for run in sweep.runs}
    return write_results(sweep, result_rows(sweep, evals))


# ----------------------------------------------------------------------------- CLI

def print_table(sweep: Sweep) -> None:
    rows = [(r.name, " ".join(f"{k}={format_value(v)}" for k, v in r.overrides.items()) or "(base)",
             str(r.output_dir)) for r in sweep.runs]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(("run", "overrides", "output_dir"))]
    for row in [("run", "overrides", "output_dir"), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(f"# {len(sweep.runs)} runs from {sweep.base}")


def _at_least_two(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"{value}: needs at least 2 images per digit")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep YAML, e.g. configs/sweeps/digits_ablation.yaml")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the runs and exit")
    mode.add_argument("--commands", action="store_true",
                      help="print one shell command per run (for a cluster or a wandb agent) and exit")
    mode.add_argument("--collect-only", action="store_true",
                      help="rebuild results.md/results.csv from the run directories; run nothing")
    parser.add_argument("--launcher", default=None,
                        help='command replacing "python" before "-m train", e.g. '
                             '"accelerate launch --multi_gpu --num_processes 8"')
    parser.add_argument("--eval", action="store_true",
                        help="add digits-FD, prompt accuracy, precision, recall and diversity of each "
                             "stage's UNet export (digits models), and the plot fd_vs_steps.png")
    parser.add_argument("--eval-per-digit", type=_at_least_two, default=20,
                        help="images per digit for --eval (>= 2: diversity compares images of one digit)")
    parser.add_argument("--eval-device", default="cpu",
                        help='where --eval renders, e.g. "cuda" (the noise is drawn on the CPU either way)')
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep)
    if args.dry_run:
        print_table(sweep)
        return 0
    if args.commands:
        for run in sweep.runs:
            print(shlex.join(train_command(sweep, run, args.launcher)))
        return 0
    failed = [] if args.collect_only else run_sweep(sweep, args.launcher)
    md_path, csv_path = collect(sweep, args.eval_per_digit if args.eval else None, args.eval_device)
    print(f"==> results: {md_path} {csv_path}")
    if failed:
        print(f"==> {len(failed)} of {len(sweep.runs)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
