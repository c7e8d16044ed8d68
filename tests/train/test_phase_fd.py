"""scripts/phase_fd.py: every phase final of a run scored at its stage's step count, a LoRA
phase's adapter folded in, the Δ measured from the stage's start."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from distill.lora import add_lora, merge_lora
from tests.conftest import ROOT, load_script
from train.config import config_to_yaml, load_config
from train.models import save_student


def _run_with_finals(root, digits_dir):
    """A run directory as training leaves it, for a 32-step stage and an 8-step stage whose
    first phase is a LoRA (random B, so folding it changes the weights)."""
    root.mkdir(parents=True, exist_ok=True)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"output_dir={root}", f"model.cache_dir={digits_dir.parent}"])
    (root / "config.yaml").write_text(config_to_yaml(cfg))
    plain = UNet2DConditionModel.from_pretrained(digits_dir, subfolder="unet")
    save_student(plain, "epsilon", root / "stages" / "32step" / "final", origin="test")
    lora = UNet2DConditionModel.from_pretrained(digits_dir, subfolder="unet")
    add_lora(lora, cfg.student.lora_rank, cfg.student.lora_alpha)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    save_student(lora, "epsilon", root / "stages" / "8step" / "0_adv_conditional" / "final", origin="test")
    merged = merge_lora(lora)
    save_student(merged, "epsilon", root / "stages" / "8step" / "2_merge" / "final", origin="test")
    save_student(merged, "epsilon", root / "stages" / "8step" / "final", origin="test")
    return merged


def test_finals_in_recipe_order_and_lora_folded(digits_dir, tmp_path):
    phase_fd = load_script("phase_fd")
    merged = _run_with_finals(tmp_path, digits_dir)
    stages = phase_fd.stage_finals(tmp_path)
    assert [(steps, [name for name, _ in rows]) for steps, rows in stages] == [
        (32, []), (8, ["start", "0_adv_conditional", "2_merge"])]
    assert stages[1][1][0][1] == tmp_path / "stages" / "32step" / "final"
    _, folded = phase_fd.student_state(tmp_path / "stages" / "8step" / "0_adv_conditional" / "final")
    expected = merged.state_dict()
    assert folded.keys() == expected.keys()
    for key in expected:  # W + ΔW per tensor equals peft's merge, within fp32 rounding
        torch.testing.assert_close(folded[key], expected[key], rtol=1e-5, atol=1e-6)
    base = UNet2DConditionModel.from_pretrained(digits_dir, subfolder="unet").state_dict()
    assert any(not torch.allclose(folded[k], base[k]) for k in base)


def test_cli_scores_every_phase_with_deltas(digits_dir, tmp_path, capsys):
    phase_fd = load_script("phase_fd")
    _run_with_finals(tmp_path / "run", digits_dir)
    out = tmp_path / "phases.md"
    assert phase_fd.main([str(tmp_path / "run"), "--per-digit", "2", "--out", str(out)]) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| run | 8 |")]
    assert len(rows) == 3
    cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows]
    assert [c[2] for c in cells] == ["start", "0_adv_conditional", "2_merge"]
    assert cells[0][4] == "+0.0"  # Δ is measured from the stage's start
    fds = [float(c[3]) for c in cells]
    assert abs(fds[1] - fds[2]) < 1.0  # the merge holds the folded LoRA phase's weights (fp32 rounding apart)
    assert fds[0] != fds[1]  # the adapter changed what the student draws
    assert abs(float(cells[1][4]) - (fds[1] - fds[0])) < 0.11
