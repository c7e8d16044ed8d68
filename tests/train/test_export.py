"""Exports load with the released SDXL-Lightning user code and reproduce the framework's own
reference sampler (METHOD.md §6); LoRAs load at the right strength (pitfall 2) in the kohya
layout diffusers and ComfyUI both read (pitfall 3); SVD extraction is exact on low-rank deltas.

Student finals are written here with train.models.save_student from the tiny digits model's
UNet with perturbed weights; no training runs. Set DISTILL_TEST_CACHE to reuse a built digits
model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from distill.lora import (
    LoraLayer,
    add_lora,
    kohya_lookup,
    kohya_name,
    lora_from_adapter,
    lora_target_modules,
    module_path,
    svd_lora,
)
from distill.sampling import decode_latents, sample
from distill.testing import sdxl_unet_on_meta
from train.config import config_to_dict, config_to_yaml, load_config
from train.digits.data import TIME_IDS
from train.errors import UserError
from train.export import export_stage, main
from train.export_info import LORA_FORMAT, UNET_FORMAT, read_export_info
from train.models import load_base, load_student, plain_state_dict, save_student
from train.sdxl_layout import lora_file_names

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a handwritten digit seven", "a handwritten digit two"]
LATENT_TOL = 1e-4  # max abs latent difference, fp32 export vs reference sampler
# Stages of configs/tiny.yaml (student steps 32, 8, 4, 2, 1) and the final each gets here.
FULL, ADAPTER, LOW_RANK, X0 = 1, 2, 3, 4  # 8step full, 4step LoRA track, 2step low-rank, 1step x0
LOW_RANK_R = 2  # rank of the exact delta of the 2-step final (< export rank 4)
# UNets, LoRAs and reports only: single files, workflows and the card have their own tests
WEIGHTS_ONLY = ("export.single_file=false", "export.workflows=false", "export.model_card=false")


def _base_unet(digits_dir: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(digits_dir, subfolder="unet").eval()


def _perturb(unet, seed: int, scale: float = 0.05) -> None:
    """W ← W + scale·std(W)·N(0, 1) on every parameter: a full-rank change everywhere."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() if p.numel() > 1 else 1.0))


def _low_rank_delta(unet, seed: int, rank: int) -> None:
    """W ← W + up·down of rank `rank` on every LoRA target only (exactly representable)."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name in lora_target_modules(unet):
            w = modules[name].weight
            up = torch.randn(w.shape[0], rank, generator=g)
            down = torch.randn(rank, w[0].numel(), generator=g)
            delta = (up @ down).reshape(w.shape)
            w.add_(delta * 0.05 * w.std() / delta.std())


def make_run(root: Path, digits_dir: Path, stages=(FULL, ADAPTER, LOW_RANK, X0), overrides=()):
    """A run directory with config.yaml (configs/tiny.yaml) and the given stage finals."""
    cache = digits_dir.parent
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      [f"output_dir={root}", f"model.cache_dir={cache}", *WEIGHTS_ONLY, *overrides])
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(config_to_yaml(cfg))
    for stage in stages:
        unet = _base_unet(digits_dir)
        prediction_type = "epsilon"
        if stage == FULL:
            _perturb(unet, seed=11)
        elif stage == ADAPTER:  # LoRA track: W is the base, adapter rank 4, alpha 8 (≠ rank)
            add_lora(unet, cfg.student.lora_rank, cfg.student.lora_alpha)
            g = torch.Generator().manual_seed(12)
            with torch.no_grad():
                for name, p in unet.named_parameters():
                    if "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        elif stage == LOW_RANK:
            _low_rank_delta(unet, seed=13, rank=LOW_RANK_R)
        elif stage == X0:
            _perturb(unet, seed=14, scale=0.02)
            prediction_type = "sample"
        final = root / "stages" / f"{cfg.stages[stage].student_steps}step" / "final"
        final.parent.mkdir(parents=True, exist_ok=True)
        save_student(unet, prediction_type, final, origin="tests/train/test_export.py")
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits_dir):
    root = tmp_path_factory.mktemp("run")
    cfg = make_run(root, digits_dir)
    written = {stage: export_stage(root, cfg, stage) for stage in (FULL, ADAPTER, LOW_RANK, X0)}
    return root, cfg, written


@pytest.fixture(scope="module")
def base(digits_dir, run):
    return load_base(digits_dir, run[1].model, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(3))


def _reference(base, final: Path, steps: int, noise):
    unet, prediction_type = load_student(final, base, fold_lora=True)
    time_ids = torch.tensor([TIME_IDS], dtype=torch.float32).repeat(len(PROMPTS), 1)
    cond = base.text.conditioning(PROMPTS, time_ids)
    return sample(unet.eval(), base.schedule, noise, cond, steps, prediction_type=prediction_type)


def _pipeline_latents(pipe, steps: int, noise, prediction_type: str | None = None):
    """The released models' user code: trailing Euler, guidance 0, N steps."""
    extra = {"prediction_type": prediction_type} if prediction_type else {}
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config,
                                                        timestep_spacing="trailing", **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=0, latents=noise.clone(),
                output_type="latent").images


def _unet_pipeline(digits_dir: Path, path: Path):
    unet = UNet2DConditionModel.from_config(str(digits_dir), subfolder="unet")  # as in the README
    unet.load_state_dict(load_file(path))
    return StableDiffusionXLPipeline.from_pretrained(digits_dir, unet=unet)


def _lora_pipeline(digits_dir: Path, path: Path):
    pipe = StableDiffusionXLPipeline.from_pretrained(digits_dir)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora()
    return pipe


def _final(run, stage: int) -> Path:
    root, cfg, _ = run
    return root / "stages" / f"{cfg.stages[stage].student_steps}step" / "final"


def _export(run, stage: int, suffix: str) -> Path:
    matches = [p for p in run[2][stage] if p.name.endswith(suffix)]
    assert len(matches) == 1, run[2][stage]
    return matches[0]


# ----------------------------------------------------------------------------- user code = ours


def test_full_unet_export_reproduces_the_reference_sampler(run, base, digits_dir, noise):
    path = _export(run, FULL, "_8step_unet.safetensors")
    assert path.name == "tiny_lightning_8step_unet.safetensors"
    pipe = _unet_pipeline(digits_dir, path)
    ours = _reference(base, _final(run, FULL), 8, noise)
    theirs = _pipeline_latents(pipe, 8, noise)
    assert (theirs - ours).abs().max() < LATENT_TOL
    # and the decoded images agree too (VAE post-processing as the pipeline does it)
    images = pipe(prompt=PROMPTS, num_inference_steps=8, guidance_scale=0, latents=noise.clone(),
                  output_type="pt").images
    torch.testing.assert_close(images, decode_latents(base.vae, ours), rtol=0, atol=1e-4)
    # sanity: the base model gives something else, so the comparison can fail
    base_latents = sample(base.unet, base.schedule, noise,
                          base.text.conditioning(PROMPTS, torch.tensor([TIME_IDS] * 2, dtype=torch.float32)), 8)
    assert (base_latents - ours).abs().max() > 100 * LATENT_TOL


def test_x0_one_step_export_reproduces_the_reference_sampler(run, base, digits_dir, noise):
    assert [p.name for p in run[2][X0]] == ["tiny_lightning_1step_unet_x0.safetensors"]  # no LoRA
    pipe = _unet_pipeline(digits_dir, run[2][X0][0])
    ours = _reference(base, _final(run, X0), 1, noise)
    assert (_pipeline_latents(pipe, 1, noise, prediction_type="sample") - ours).abs().max() < LATENT_TOL
    # read as epsilon (the user forgetting prediction_type="sample") it is a different image
    assert (_pipeline_latents(pipe, 1, noise, "epsilon") - ours).abs().max() > 100 * LATENT_TOL


def test_adapter_lora_with_alpha_not_rank_loads_at_the_right_strength(run, base, digits_dir, noise):
    root, cfg, written = run
    assert cfg.student.lora_alpha != cfg.student.lora_rank
    path = _export(run, ADAPTER, "_4step_lora.safetensors")
    report = json.loads(_export(run, ADAPTER, "_lora_report.json").read_text())
    assert report["source"] == "adapter" and report["alpha"] == cfg.student.lora_alpha
    pipe = _lora_pipeline(digits_dir, path)
    merged, _ = load_student(_final(run, ADAPTER), base, fold_lora=True)
    fused, expected = plain_state_dict(pipe.unet), plain_state_dict(merged)
    assert fused.keys() == expected.keys()
    for key, value in expected.items():  # fused weights = the framework's merged weights
        torch.testing.assert_close(fused[key], value, rtol=0, atol=1e-6)
    ours = _reference(base, _final(run, ADAPTER), 4, noise)
    assert (_pipeline_latents(pipe, 4, noise) - ours).abs().max() < LATENT_TOL
    # the same file with alpha overwritten by the rank (alpha dropped) is measurably off
    tensors = load_file(path)
    module = "down_blocks.0.resnets.0.conv1"
    name = kohya_name(lora_file_names(base.unet, [module])[module])  # original SDXL name
    layer = LoraLayer(tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"],
                      float(cfg.student.lora_rank))
    wrong = base.unet.state_dict()[f"{module}.weight"] + layer.delta()
    assert (wrong - expected[f"{module}.weight"]).abs().max() > 1e-4


def test_exact_low_rank_delta_extracts_exactly(run, base, digits_dir, noise):
    report = json.loads(_export(run, LOW_RANK, "_lora_report.json").read_text())
    assert report["source"] == "svd" and report["exact"] is True
    # fp32 rounding of W = W_base + ΔW is all that is left (~5e-7 here)
    assert report["overall_rel_error"] < 1e-5 and not report["uncovered"]
    # export rank 4 (student.lora_rank) ≥ the delta's rank 2: exact
    assert all(v["rel_error"] < 1e-5 and v["rank"] == 4 for v in report["layers"].values())
    assert len(report["layers"]) == len(lora_target_modules(base.unet))
    pipe = _lora_pipeline(digits_dir, _export(run, LOW_RANK, "_2step_lora.safetensors"))
    ours = _reference(base, _final(run, LOW_RANK), 2, noise)
    assert (_pipeline_latents(pipe, 2, noise) - ours).abs().max() < LATENT_TOL


def test_svd_of_a_full_rank_change_reports_its_error(run, base):
    report = json.loads(_export(run, FULL, "_lora_report.json").read_text())
    assert report["source"] == "svd" and report["exact"] is False and report["rank"] == 4
    assert 0.1 < report["overall_rel_error"] < 1
    assert all(0 <= v["rel_error"] < 1 for v in report["layers"].values())
    # biases, norms, conv_in/out and time embeddings changed too and no LoRA carries them
    assert "conv_in.weight" in report["uncovered"] and 0 < report["uncovered_rel_norm"] < 1
    tensors = load_file(_export(run, FULL, "_8step_lora.safetensors"))
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas and all(float(v) == 4.0 for v in alphas.values())  # alpha = rank: scale 1


# ----------------------------------------------------------------------------- metadata, layout


def test_metadata(run):
    root, cfg, written = run
    for stage, path in [(FULL, _export(run, FULL, "unet.safetensors")),
                        (X0, _export(run, X0, "unet_x0.safetensors"))]:
        info = read_export_info(path)
        steps = cfg.stages[stage].student_steps
        assert info.format == UNET_FORMAT and info.num_inference_steps == steps
        assert info.prediction_type == ("sample" if stage == X0 else "epsilon")
        assert info.scheduler == {"class_name": "EulerDiscreteScheduler", "timestep_spacing": "trailing",
                                  "prediction_type": info.prediction_type}
        assert info.base_model == "digits:tiny" and info.lora_rank == 0
        assert info.config == json.loads(json.dumps(config_to_dict(cfg)))
        with safe_open(str(path), framework="pt") as f:
            assert all(isinstance(v, str) for v in f.metadata().values())
            assert f.get_tensor("conv_in.weight").dtype == torch.float32  # tiny.yaml: export.dtype fp32
    adapter = read_export_info(_export(run, ADAPTER, "lora.safetensors"))
    assert (adapter.format, adapter.lora_rank, adapter.lora_alpha) == (LORA_FORMAT, 4, 8.0)
    assert adapter.num_inference_steps == 4
    svd = read_export_info(_export(run, LOW_RANK, "lora.safetensors"))
    assert (svd.lora_rank, svd.lora_alpha) == (4, 4.0)


def test_kohya_tensor_layout(run):
    tensors = load_file(_export(run, ADAPTER, "_4step_lora.safetensors"))
    assert all(k.startswith("lora_unet_") for k in tensors)
    conv = "lora_unet_input_blocks_1_0_in_layers_2"  # original SDXL name of down_blocks.0.resnets.0.conv1
    assert tensors[f"{conv}.lora_down.weight"].shape[1:] == (32, 3, 3)  # (r, in, kh, kw)
    assert tensors[f"{conv}.lora_up.weight"].shape[1:] == (4, 1, 1)  # (out, r, 1, 1)
    assert tensors[f"{conv}.alpha"].shape == () and float(tensors[f"{conv}.alpha"]) == 8.0


def test_diffusers_lora_names_stay_available(tmp_path, digits_dir, base):
    """export.lora_names=diffusers writes the diffusers module paths, which diffusers loads too."""
    cfg = make_run(tmp_path, digits_dir, stages=(ADAPTER,), overrides=["export.lora_names=diffusers"])
    path = next(p for p in export_stage(tmp_path, cfg, ADAPTER) if p.name.endswith("_lora.safetensors"))
    tensors = load_file(path)
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in tensors
    assert not any("input_blocks" in k for k in tensors)
    assert read_export_info(path).lora_names == "diffusers"
    fused = plain_state_dict(_lora_pipeline(digits_dir, path).unet)
    merged, _ = load_student(_final((tmp_path, cfg, None), ADAPTER), base, fold_lora=True)
    for key, value in plain_state_dict(merged).items():
        torch.testing.assert_close(fused[key], value, rtol=0, atol=1e-6)


def test_cli_exports_selected_stages_in_another_dtype(tmp_path, digits_dir):
    make_run(tmp_path, digits_dir, stages=(LOW_RANK,))
    written = main([str(tmp_path), "--stages", "2", "--dtype", "fp16", "--lora-rank", "3"])
    assert [p.name for p in written] == ["tiny_lightning_2step_unet.safetensors",
                                         "tiny_lightning_2step_lora.safetensors",
                                         "tiny_lightning_2step_lora_report.json"]
    for path in written[:2]:
        assert {v.dtype for v in load_file(path).values() if v.ndim} == {torch.float16}
    assert read_export_info(written[1]).lora_rank == 3  # --lora-rank wins over export.lora_rank
    with pytest.raises(UserError, match="no finished student for the 8-step stage"):
        main([str(tmp_path), "--stages", "8"])  # no 8-step final in this run


@pytest.fixture(scope="module")
def sdxl_meta():
    return sdxl_unet_on_meta()


def test_kohya_names_round_trip(sdxl_meta):
    names = [n for n, _ in sdxl_meta.named_modules() if n]  # every module of the SDXL UNet
    lookup = kohya_lookup(names)
    for name in names:
        key = kohya_name(name)
        assert module_path(key, lookup) == name
        assert module_path(f"{key}.lora_down.weight", lookup) == name
    assert kohya_name("down_blocks.1.attentions.0.proj_in") == "lora_unet_down_blocks_1_attentions_0_proj_in"
    with pytest.raises(ValueError, match="share the kohya name"):
        kohya_lookup(["a.b_c", "a_b.c"])
    with pytest.raises(KeyError):
        module_path("lora_unet_nothing_here.alpha", ["conv_in"])


def test_diffusers_maps_every_sdxl_target_back_to_its_module(sdxl_meta):
    """diffusers' kohya converter turns our key for every LCM-LoRA target of the real SDXL
    architecture into exactly that module's peft key."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft

    targets = lora_target_modules(sdxl_meta)
    state = {}
    for m in targets:
        state.update({f"{kohya_name(m)}.lora_down.weight": torch.zeros(1),
                      f"{kohya_name(m)}.lora_up.weight": torch.zeros(1),
                      f"{kohya_name(m)}.alpha": torch.tensor(2.0)})
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(state)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert set(peft) == {f"{m}.lora_{ab}.weight" for m in targets for ab in "AB"}
    # one alpha per module, in diffusers' intermediate naming (their strength is checked end
    # to end through load_lora_weights + fuse_lora on the digits model above)
    assert len(alphas) == len(targets) and set(alphas.values()) == {2.0}


# ----------------------------------------------------------------------------- SVD math


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (16, 8, 3, 3)])
def test_svd_lora_error_is_the_discarded_spectrum(shape):
    g = torch.Generator().manual_seed(0)
    out_features, in_features = shape[0], int(torch.tensor(shape[1:]).prod())
    u, _ = torch.linalg.qr(torch.randn(out_features, 8, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_features, 8, generator=g, dtype=torch.float64))
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    delta = (u * s @ v.T).reshape(shape).float()
    for rank in (8, 3):
        result = svd_lora(delta, rank)
        expected = (s[rank:].square().sum() / s.square().sum()).sqrt().item()
        assert result.rel_error == pytest.approx(expected, abs=1e-6)
        assert result.layer.alpha == rank and result.layer.up.shape[1] == rank
        assert result.layer.delta().shape == delta.shape
        if rank == 8:
            torch.testing.assert_close(result.layer.delta(), delta, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_svd_lora_factors_are_the_truncated_svd_of_a_full_rank_delta(shape):
    # the CPU path goes through the smaller Gram matrix's eigenvectors: the same rank-r
    # product and factor norms as LAPACK's SVD, on a delta with no exact low-rank structure
    delta = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    rank = 6
    layer = svd_lora(delta.float(), rank).layer
    torch.testing.assert_close(layer.delta().double(), (u[:, :rank] * s[:rank]) @ vh[:rank],
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.down.double() @ layer.down.double().T, torch.eye(rank, dtype=torch.float64),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.up.double().norm(dim=0), s[:rank], rtol=1e-5, atol=0)


def test_lora_from_adapter_keeps_peft_shapes():
    state = {"a.lora_A.weight": torch.ones(2, 5), "a.lora_B.weight": torch.ones(3, 2)}
    layer = lora_from_adapter(state, alpha=4.0)["a"]
    assert layer.rank == 2 and layer.alpha == 4.0
    torch.testing.assert_close(layer.delta(), torch.full((3, 5), 4.0))  # (4 / 2)·(1·1·2)
