"""ComfyUI workflows (train/comfyui.py): one per exported weights file, in API format, valid for
the schema written from ComfyUI's node definitions, sampling as the distilled model needs
(euler, sgm_uniform, CFG 1, its step count, x0 sampling for the x0 model); and the validator
rejects what ComfyUI would. Set DISTILL_TEST_CACHE to reuse a built digits model.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from conftest import export_tiny_finals

from train.comfyui import NODES, base_checkpoint_name, validate, workflow
from train.export_info import read_export_info

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, digits_dir) -> Path:
    """A 4-step LoRA-track final (UNet, checkpoint, LoRA) and a 1-step x0 final, exported."""
    root = tmp_path_factory.mktemp("run")
    export_tiny_finals(root, digits_dir, ["export.model_card=false"], origin="tests/train/test_comfyui.py")
    return root / "export"


def _node(graph: dict, class_type: str) -> dict:
    found = [n for n in graph.values() if n["class_type"] == class_type]
    assert len(found) == 1, (class_type, graph)
    return found[0]


def _source(graph: dict, link: list) -> dict:
    return graph[link[0]]


def test_a_valid_workflow_next_to_every_weights_file(export_dir):
    weights = sorted(export_dir.glob("*.safetensors"))
    assert [p.name for p in weights] == [
        "tiny_lightning_1step_unet_x0.safetensors", "tiny_lightning_1step_x0.safetensors",
        "tiny_lightning_4step.safetensors", "tiny_lightning_4step_lora.safetensors",
        "tiny_lightning_4step_unet.safetensors"]
    workflows = sorted(export_dir.glob("*_comfyui.json"))
    assert [p.name for p in workflows] == [p.name.replace(".safetensors", "_comfyui.json") for p in weights]
    for path, weights_file in zip(workflows, weights):
        graph = json.loads(path.read_text())
        assert validate(graph) == [], path.name
        info = read_export_info(weights_file)
        sampler = _node(graph, "KSampler")["inputs"]
        assert (sampler["steps"], sampler["cfg"], sampler["sampler_name"], sampler["scheduler"],
                sampler["denoise"]) == (info.num_inference_steps, 1.0, "euler", "sgm_uniform", 1.0)
        assert _node(graph, "EmptyLatentImage")["inputs"] == {"width": 32, "height": 32, "batch_size": 1}
        assert _node(graph, "SaveImage")["inputs"]["filename_prefix"] == \
            weights_file.stem
        model = _source(graph, sampler["model"])
        if info.prediction_type == "sample":  # ComfyUI must read the output as x0
            assert model["class_type"] == "ModelSamplingDiscrete" and model["inputs"]["sampling"] == "x0"
            model = _source(graph, model["inputs"]["model"])
        else:
            assert not [n for n in graph.values() if n["class_type"] == "ModelSamplingDiscrete"]
        loaded = {"CheckpointLoaderSimple": "ckpt_name", "UNETLoader": "unet_name",
                  "LoraLoaderModelOnly": "lora_name"}
        assert model["inputs"][loaded[model["class_type"]]] == weights_file.name
        if model["class_type"] == "LoraLoaderModelOnly":  # on the base checkpoint's model
            base = _source(graph, model["inputs"]["model"])
            assert base["inputs"]["ckpt_name"] == base_checkpoint_name("digits:tiny")
            assert model["inputs"]["strength_model"] == 1.0


def test_base_checkpoint_names():
    assert base_checkpoint_name("stabilityai/stable-diffusion-xl-base-1.0") == "sd_xl_base_1.0.safetensors"
    assert base_checkpoint_name("/data/stable-diffusion-xl-base-1.0/") == "sd_xl_base_1.0.safetensors"
    assert base_checkpoint_name("digits:full") == "digits-full.safetensors"


@pytest.fixture
def graph() -> dict:
    return workflow("lora", "x_4step_lora.safetensors", base_checkpoint="sd_xl_base_1.0.safetensors",
                    steps=4, prediction_type="epsilon", prompt="a cat", width=1024, height=1024)


def _with(graph: dict, class_type: str, **inputs) -> dict:
    graph = copy.deepcopy(graph)
    node = next(n for n in graph.values() if n["class_type"] == class_type)
    for name, value in inputs.items():
        if value is None:
            del node["inputs"][name]
        else:
            node["inputs"][name] = value
    return graph


@pytest.mark.parametrize("mutate, message", [
    (lambda g: _with(g, "KSampler", scheduler="trailing"), "is not one of"),
    (lambda g: _with(g, "KSampler", steps=0), "outside"),
    (lambda g: _with(g, "KSampler", cfg="1.0"), "needs FLOAT"),
    (lambda g: _with(g, "KSampler", seed=True), "needs INT"),
    (lambda g: _with(g, "KSampler", denoise=None), "missing input 'denoise'"),
    (lambda g: _with(g, "KSampler", guidance=0), "unknown input 'guidance'"),
    (lambda g: _with(g, "KSampler", model=["1", 1]), "needs MODEL"),  # CheckpointLoader output 1 is CLIP
    (lambda g: _with(g, "KSampler", model=["99", 0]), "unknown node"),
    (lambda g: _with(g, "VAEDecode", vae=["1", 3]), "has no output 3"),
    (lambda g: _with(g, "LoraLoaderModelOnly", lora_name="x_4step_lora"), "model file name"),
    (lambda g: _with(g, "EmptyLatentImage", width=8), "outside"),
    (lambda g: {k: v for k, v in g.items() if v["class_type"] != "SaveImage"}, "no output node"),
    (lambda g: {**g, "99": {"class_type": "KSamplerAdvanced", "inputs": {}}}, "unknown node class"),
    (lambda g: _with(g, "LoraLoaderModelOnly", model=[next(k for k, v in g.items()
                                                           if v["class_type"] == "KSampler"), 0]),
     "needs MODEL"),
])
def test_validator_rejects_what_comfyui_would(graph, mutate, message):
    assert validate(graph) == []
    errors = validate(mutate(graph))
    assert any(message in e for e in errors), errors


def test_validator_finds_cycles(graph):
    looped = copy.deepcopy(graph)
    lora = next(k for k, v in looped.items() if v["class_type"] == "LoraLoaderModelOnly")
    sampling = str(len(looped) + 1)
    looped[sampling] = {"class_type": "ModelSamplingDiscrete",
                        "inputs": {"model": [lora, 0], "sampling": "eps", "zsnr": False}}
    looped[lora]["inputs"]["model"] = [sampling, 0]
    assert validate(looped) == ["the links form a cycle"]


def test_schema_names_comfyui_node_inputs():
    """Spot checks against ComfyUI's definitions (nodes.py, nodes_model_advanced.py)."""
    assert set(NODES["KSampler"].inputs) == {"model", "seed", "steps", "cfg", "sampler_name", "scheduler",
                                             "positive", "negative", "latent_image", "denoise"}
    assert NODES["CheckpointLoaderSimple"].outputs == ("MODEL", "CLIP", "VAE")
    assert "x0" in NODES["ModelSamplingDiscrete"].inputs["sampling"].options
    assert "sgm_uniform" in NODES["KSampler"].inputs["scheduler"].options
