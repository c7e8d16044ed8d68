"""Config loading: presets validate, round trip, and bad input fails with the promised message."""

import subprocess
import sys
from pathlib import Path

import pytest

from train.config import Config, ConfigError, config_to_yaml, load_config

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.stem)
def test_every_preset_validates(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config) and cfg.stages


def test_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs/digits.yaml", ["optim.lr_mse=3e-4", "stages.1.phases.0.steps=7"])
    assert cfg.optim.lr_mse == 3e-4 and cfg.stages[1].phases[0].steps == 7
    path = tmp_path / "resolved.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(path) == cfg


def test_overrides_reach_nested_lists():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["discriminator.bucket_edges=[100,500]",
                                                   "validation.prompts=[a,b]"])
    assert cfg.discriminator.bucket_edges == [100, 500]
    assert cfg.validation.prompts == ["a", "b"]


@pytest.mark.parametrize("override, expected", [
    ("optim.lr_schedul=cosine", "optim.lr_schedul: unknown key; allowed: [" ),
    ("optim.lr_schedul=cosine", "did you mean 'lr_schedule'?"),
    ("stages.0.phases.0.kinf=mse", "stages.0.phases.0.kinf: unknown key"),
    ("stages.1.phases.0.kind=adv_conditonal", "stages.1.phases.0.kind: 'adv_conditonal' is not one of"),
    ("stages.1.phases.0.kind=adv_conditonal", "did you mean 'adv_conditional'?"),
    ("runtime.mixed_precision=fp8", "runtime.mixed_precision: 'fp8' is not one of ['no', 'fp16', 'bf16']"),
    ("data.batch_size=abc", "data.batch_size:"),
    ("data.batch_size=0", "data.batch_size: must be > 0, got 0"),
    ("stages.2.teacher_steps=16", "stages.2.teacher_steps: 16 must equal the previous stage's student_steps 8"),
    ("stages.1.phases.3.form=lora", "stages.1.phases.3"),
    ("discriminator.renoise_weights=[1,1]", "discriminator.renoise_weights: need 4 non-negative weights"),
    ("model.base=digits:huge", "model.base (digits:<size>): 'huge' is not one of ['full', 'tiny']"),
    ("model.base=digits:full:1", "model.base: '1' in 'digits:full:1' is not seed<N>"),
    ("model.base=/models/sdxl", "validation.prompts: required unless model.base is an embedded"),
    ("nonsense=1", "nonsense: unknown key"),
])
def test_bad_values_name_key_value_and_allowed(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/tiny.yaml", [override])
    assert expected in str(err.value)


def test_unknown_key_in_yaml_reports_full_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs/tiny.yaml").read_text().replace("lora_alpha:", "lora_alfa:"))
    with pytest.raises(ConfigError, match=r"student\.lora_alfa: unknown key.*did you mean 'lora_alpha'"):
        load_config(bad)


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("nope.yaml")


@pytest.mark.e2e
def test_cli_dry_run_prints_resolved_config_and_recipe():
    result = subprocess.run([sys.executable, "-m", "train", "configs/tiny.yaml", "--dry-run",
                             "optim.lr_mse=0.001"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "lr_mse: 0.001" in result.stdout
    assert "stages/1step/0_x0_convert" in result.stdout


@pytest.mark.e2e
def test_cli_bad_key_exits_2_before_loading_models():
    result = subprocess.run([sys.executable, "-m", "train", "configs/tiny.yaml", "optim.lrr=1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "error: optim.lrr: unknown key" in result.stderr and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
