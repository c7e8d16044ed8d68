"""The model card export/README.md (train/model_card.py): Hugging Face front matter, every file
listed, diffusers snippets that run as written (on the digits model, CPU), sample grids
rendered from the exported files, the recipe, and `--card-only`. Set DISTILL_TEST_CACHE to
reuse a built digits model.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import export_tiny_finals
from PIL import Image

from train.digits.data import DIGIT_PROMPTS
from train.export import main
from train.generate import render
from train.model_card import base_card_metadata, hub_id
from train.pipeline import load_pipeline

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_dir):
    """A 4-step LoRA-track final and a 1-step x0 final exported with everything, fp16."""
    root = tmp_path_factory.mktemp("run")
    cfg = export_tiny_finals(root, digits_dir, ["export.dtype=fp16"], origin="tests/train/test_model_card.py")
    return root, cfg


def _card(run) -> str:
    return (run[0] / "export" / "README.md").read_text()


def test_front_matter_follows_hugging_face_conventions(run):
    text = _card(run)
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, text[:200]
    meta = yaml.safe_load(match.group(1))
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert {"text-to-image", "stable-diffusion-xl", "sdxl-lightning", "lora"} <= set(meta["tags"])
    # digits:tiny is no Hub model and the digits folder states no license: neither is invented
    assert "base_model" not in meta and "license" not in meta


def test_every_exported_file_is_in_the_table(run):
    text = _card(run)
    files = sorted(p.name for p in (run[0] / "export").iterdir()
                   if p.name not in ("README.md", "manifest.json"))  # the card, the integrity record
    assert len(files) == 13  # 5 weights, 5 workflows, 1 LoRA report, 2 sample grids
    for name in files:
        assert f"| `{name}` |" in text, name
    assert "from_single_file" in text and "UNETLoader" in text and "sdxl_merge_lora.py" in text


def _snippets(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_snippets_run_as_written(run, digits_dir, tmp_path):
    """Each diffusers snippet, with only `base` and the device/dtype line replaced, renders."""
    export = run[0] / "export"
    for path in export.glob("*.safetensors"):
        os.symlink(path, tmp_path / path.name)
    snippets = _snippets(_card(run))
    assert len(snippets) == 5  # UNet 4 / UNet x0 1 / LoRA 4 / checkpoint 4 / checkpoint x0 1
    assert sum('prediction_type="sample"' in s for s in snippets) == 2
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        for code in snippets:
            assert 'device, dtype = "cuda", torch.float16\n' in code
            code = code.replace('device, dtype = "cuda", torch.float16', 'device, dtype = "cpu", torch.float32')
            code = re.sub(r'base = ".*?"', f'base = "{digits_dir}"', code)
            (tmp_path / "output.png").unlink(missing_ok=True)
            exec(compile(code, "<model card snippet>", "exec"), {})
            assert Image.open(tmp_path / "output.png").size == (32, 32)
    finally:
        os.chdir(cwd)


def test_sample_grids_come_from_the_exported_unet(run, digits_dir):
    root, cfg = run
    export = root / "export"
    for steps, unet in ((4, "tiny_lightning_4step_unet.safetensors"), (1, "tiny_lightning_1step_unet_x0.safetensors")):
        grid = np.asarray(Image.open(export / f"tiny_lightning_{steps}step_samples.png"))
        assert grid.shape == (32, 32 * len(DIGIT_PROMPTS), 3)  # one row, the digits prompts
        assert f"![{steps} step" in _card(run)
        pipe = load_pipeline(digits_dir, export / unet)
        first = render(pipe, [DIGIT_PROMPTS[0]], steps, cfg.validation.seed)[0]
        np.testing.assert_array_equal(grid[:, :32], np.asarray(first))


def test_recipe_and_lora_error_are_described(run):
    text = _card(run)
    assert "| 0 | 128 → 32 | 3 |" in text and "| 4 | 2 → 1 |" in text
    assert "x0_convert: 2, full" in text and "(skip-level)" in text
    assert "`student.lora_rank`: 4" in text and "`student.lora_alpha`: 8.0" in text
    assert "`tiny_lightning_4step_lora.safetensors` | adapter |" in text
    assert "trailing" in text and "guidance_scale=0" in text and "ModelSamplingDiscrete" in text


def test_card_only_rewrites_the_card_alone(run):
    root, _ = run
    export = root / "export"
    unchanged = {"README.md", "manifest.json"}  # the manifest records the card's new hash
    before = {p.name: p.stat().st_mtime_ns for p in export.iterdir() if p.name not in unchanged}
    (root / "evaluation.md").write_text("| steps | FD ↓ | accuracy ↑ |\n|---|---|---|\n| 4 | 12.3 | 0.9 |\n")
    try:
        assert main([str(root), "--card-only"]) == [export / "README.md"]
        text = _card(run)
        assert "## Evaluation" in text and "| 4 | 12.3 | 0.9 |" in text
        assert {p.name: p.stat().st_mtime_ns for p in export.iterdir() if p.name not in unchanged} == before
    finally:
        (root / "evaluation.md").unlink()
        main([str(root), "--card-only"])
    assert "## Evaluation" not in _card(run)


def test_base_identity_and_license(tmp_path):
    assert hub_id("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert hub_id("digits:tiny") is None and hub_id(str(tmp_path)) is None
    (tmp_path / "README.md").write_text("---\nlicense: openrail++\ntags:\n- text-to-image\n---\n# SDXL\n")
    assert base_card_metadata(tmp_path)["license"] == "openrail++"
    assert base_card_metadata(tmp_path / "missing") == {}
