"""python -m train.generate: renders an export through the diffusers pipeline at its own step
count, refuses another one unless forced, and writes a PNG grid. Set DISTILL_TEST_CACHE to reuse a
built digits model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from train.config import config_to_yaml, load_config
from train.errors import UserError
from train.export import export_stage
from train.export_info import read_export_info
from train.generate import choose_steps, main
from train.models import save_student
from train.pipeline import load_pipeline

REPO = Path(__file__).resolve().parents[2]
STAGE = 3  # configs/tiny.yaml's 2-step stage


@pytest.fixture(scope="module")
def exports(tmp_path_factory, digits_dir) -> list[Path]:
    """UNet + LoRA exports of a 2-step final whose weights are the base's, perturbed."""
    root = tmp_path_factory.mktemp("run")
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      [f"output_dir={root}", f"model.cache_dir={digits_dir.parent}"])
    (root / "config.yaml").write_text(config_to_yaml(cfg))
    unet = UNet2DConditionModel.from_pretrained(digits_dir, subfolder="unet")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02 * (p.std() if p.numel() > 1 else 1.0))
    save_student(unet, "epsilon", root / "stages" / "2step" / "final", origin="test_generate")
    return export_stage(root, cfg, STAGE)


def test_step_count_comes_from_the_metadata(exports):
    info = read_export_info(exports[0])
    assert info.num_inference_steps == 2
    assert choose_steps(info, None) == 2 and choose_steps(info, 2) == 2
    with pytest.raises(UserError, match="distilled for 2 steps, not 4"):
        choose_steps(info, 4)
    assert choose_steps(info, 4, force=True) == 4


def test_cli_refuses_another_step_count_unless_forced(exports, digits_dir, tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = ["--base", str(digits_dir), "--export", str(exports[0]), "--prompt", "a handwritten digit one"]
    with pytest.raises(UserError, match="distilled for 2 steps"):
        main([*args, "--steps", "4", "--out", str(out)])
    assert not out.exists()
    main([*args, "--steps", "4", "--force-steps", "--out", str(out)])
    assert Image.open(out).size == (32, 32)


def test_cli_writes_a_grid_of_the_pipeline_images(exports, digits_dir, tmp_path):
    out = tmp_path / "unet.png"
    prompts = ["a handwritten digit three", "a handwritten digit eight"]
    main(["--base", str(digits_dir), "--export", str(exports[0]), "--prompt", prompts[0],
          "--prompt", prompts[1], "--images-per-prompt", "2", "--seed", "5", "--out", str(out)])
    grid = np.asarray(Image.open(out))
    assert grid.shape == (64, 64, 3) and grid.std() > 0
    # the grid holds exactly what the pipeline renders for that seed (prompt-major rows)
    pipe, info = load_pipeline(digits_dir, exports[0]), read_export_info(exports[0])
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    images = pipe(prompt=prompts, num_inference_steps=info.num_inference_steps, guidance_scale=0.0,
                  num_images_per_prompt=2, generator=torch.Generator().manual_seed(5)).images
    np.testing.assert_array_equal(grid[32:, :32], np.asarray(images[2]))


def test_cli_renders_a_lora_and_checks_the_kind(exports, digits_dir, tmp_path):
    lora = next(p for p in exports if p.name.endswith("_lora.safetensors"))
    out = tmp_path / "lora.png"
    main(["--base", str(digits_dir), "--export", str(lora), "--lora", "--prompt", "a handwritten digit four",
          "--out", str(out)])
    assert Image.open(out).size == (32, 32)
    with pytest.raises(UserError, match="not a LoRA"):
        main(["--base", str(digits_dir), "--export", str(exports[0]), "--lora", "--prompt", "x",
              "--out", str(tmp_path / "no.png")])
