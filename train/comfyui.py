"""ComfyUI workflows for the exports, in ComfyUI's API format, and the schema they are checked by.

API format (what ComfyUI's "Save (API)" writes and its `/prompt` endpoint takes): a JSON object
of nodes by id, `{"3": {"class_type": "KSampler", "inputs": {"steps": 4, "model": ["4", 0], …}}}`,
where an input is either a widget value or a link `[source node id, output index]`.

Each weights file `<stem>.safetensors` gets `<stem>_comfyui.json`: a checkpoint loads with
CheckpointLoaderSimple, a UNet with UNETLoader (text encoders and VAE from the base's
checkpoint), a LoRA with LoraLoaderModelOnly over the base's checkpoint; then KSampler with
euler, sgm_uniform (ComfyUI's trailing-like grid), CFG 1.0 (ComfyUI's "no guidance") and the
distilled step count. The x0 (1-step) model adds ModelSamplingDiscrete(sampling="x0"), which
ComfyUI needs to read its output as x0 instead of noise.

NODES is written from ComfyUI's node definitions (nodes.py, comfy_extras/nodes_model_advanced.py,
comfy/samplers.py: node class names, required input names, their types and ranges, output
types), for the nodes these workflows use; `validate` checks a workflow against it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from train.export_info import CHECKPOINT_FORMAT, LORA_FORMAT, UNET_FORMAT, read_export_info
from train.files import write_text_atomic
from train.model_card import sample_prompts

# ----------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Link:
    """An input fed by another node's output of this ComfyUI type (MODEL, CLIP, LATENT, …)."""

    type: str


@dataclass(frozen=True)
class Number:
    kind: str  # "INT" | "FLOAT"
    min: float
    max: float


@dataclass(frozen=True)
class Choice:
    options: tuple[str, ...]


@dataclass(frozen=True)
class FileName:
    """A combo of the files in a ComfyUI models folder; only the name can be checked here."""

    folder: str


@dataclass(frozen=True)
class Text:
    pass


@dataclass(frozen=True)
class Flag:
    pass


@dataclass(frozen=True)
class Node:
    inputs: Mapping[str, object]  # required inputs: name → Link | Number | Choice | FileName | Text | Flag
    outputs: tuple[str, ...]
    output_node: bool = False


SAMPLERS = (  # comfy/samplers.py KSAMPLER_NAMES + SAMPLER_NAMES extras
    "euler", "euler_cfg_pp", "euler_ancestral", "euler_ancestral_cfg_pp", "heun", "heunpp2", "dpm_2",
    "dpm_2_ancestral", "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde", "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_cfg_pp", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm",
    "ipndm", "ipndm_v", "deis", "res_multistep", "res_multistep_cfg_pp", "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp", "gradient_estimation", "gradient_estimation_cfg_pp", "er_sde",
    "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece", "ddim", "uni_pc", "uni_pc_bh2")
SCHEDULERS = ("simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
              "linear_quadratic", "kl_optimal")  # comfy/samplers.py SCHEDULER_NAMES
MAX_RESOLUTION = 16384
SEED_MAX = 2**64 - 1

NODES: dict[str, Node] = {
    "CheckpointLoaderSimple": Node({"ckpt_name": FileName("checkpoints")}, ("MODEL", "CLIP", "VAE")),
    "UNETLoader": Node({"unet_name": FileName("diffusion_models"),
                        "weight_dtype": Choice(("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"))},
                       ("MODEL",)),
    "LoraLoaderModelOnly": Node({"model": Link("MODEL"), "lora_name": FileName("loras"),
                                 "strength_model": Number("FLOAT", -100.0, 100.0)}, ("MODEL",)),
    "ModelSamplingDiscrete": Node({"model": Link("MODEL"),
                                   "sampling": Choice(("eps", "v_prediction", "lcm", "x0", "img_to_img")),
                                   "zsnr": Flag()}, ("MODEL",)),
    "CLIPTextEncode": Node({"text": Text(), "clip": Link("CLIP")}, ("CONDITIONING",)),
    "EmptyLatentImage": Node({"width": Number("INT", 16, MAX_RESOLUTION),
                              "height": Number("INT", 16, MAX_RESOLUTION),
                              "batch_size": Number("INT", 1, 4096)}, ("LATENT",)),
    "KSampler": Node({"model": Link("MODEL"), "seed": Number("INT", 0, SEED_MAX),
                      "steps": Number("INT", 1, 10000), "cfg": Number("FLOAT", 0.0, 100.0),
                      "sampler_name": Choice(SAMPLERS), "scheduler": Choice(SCHEDULERS),
                      "positive": Link("CONDITIONING"), "negative": Link("CONDITIONING"),
                      "latent_image": Link("LATENT"), "denoise": Number("FLOAT", 0.0, 1.0)}, ("LATENT",)),
    "VAEDecode": Node({"samples": Link("LATENT"), "vae": Link("VAE")}, ("IMAGE",)),
    "SaveImage": Node({"images": Link("IMAGE"), "filename_prefix": Text()}, (), output_node=True),
}
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _check_value(spec, value, where: str, nodes: Mapping) -> list[str]:
    if isinstance(spec, Link):
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
                and isinstance(value[1], int) and not isinstance(value[1], bool)):
            return [f"{where}: a {spec.type} input must be a link [node id, output index], got {value!r}"]
        source = nodes.get(value[0])
        if not isinstance(source, Mapping) or source.get("class_type") not in NODES:
            return [f"{where}: links to unknown node {value[0]!r}"]
        outputs = NODES[source["class_type"]].outputs
        if not 0 <= value[1] < len(outputs):
            return [f"{where}: {source['class_type']} has no output {value[1]}"]
        if outputs[value[1]] != spec.type:
            return [f"{where}: needs {spec.type}, output {value[1]} of {source['class_type']} is "
                    f"{outputs[value[1]]}"]
        return []
    if isinstance(spec, Number):
        ok_type = isinstance(value, int) if spec.kind == "INT" else isinstance(value, (int, float))
        if isinstance(value, bool) or not ok_type:
            return [f"{where}: needs {spec.kind}, got {value!r}"]
        if not spec.min <= value <= spec.max:
            return [f"{where}: {value} outside [{spec.min}, {spec.max}]"]
        return []
    if isinstance(spec, Choice):
        return [] if value in spec.options else [f"{where}: {value!r} is not one of {list(spec.options)}"]
    if isinstance(spec, FileName):
        if not isinstance(value, str) or not value.endswith(MODEL_SUFFIXES):
            return [f"{where}: needs a model file name in models/{spec.folder}, got {value!r}"]
        return []
    if isinstance(spec, Text):
        return [] if isinstance(value, str) else [f"{where}: needs STRING, got {value!r}"]
    if isinstance(spec, Flag):
        return [] if isinstance(value, bool) else [f"{where}: needs BOOLEAN, got {value!r}"]
    raise TypeError(spec)


def validate(workflow: Mapping) -> list[str]:
    """Everything wrong with an API-format workflow for NODES (empty: valid)."""
    if not isinstance(workflow, Mapping) or not workflow:
        return ["a workflow is a non-empty JSON object of nodes by id"]
    errors = []
    for node_id, node in workflow.items():
        where = f"node {node_id}"
        if not isinstance(node, Mapping) or set(node) - {"class_type", "inputs", "_meta"}:
            errors.append(f"{where}: a node has class_type, inputs and optionally _meta")
            continue
        spec = NODES.get(node.get("class_type"))
        if spec is None:
            errors.append(f"{where}: unknown node class {node.get('class_type')!r}")
            continue
        inputs = node.get("inputs")
        if not isinstance(inputs, Mapping):
            errors.append(f"{where}: inputs must be an object")
            continue
        missing, unknown = set(spec.inputs) - set(inputs), set(inputs) - set(spec.inputs)
        errors += [f"{where} ({node['class_type']}): missing input {n!r}" for n in sorted(missing)]
        errors += [f"{where} ({node['class_type']}): unknown input {n!r}" for n in sorted(unknown)]
        for name, value in inputs.items():
            if name in spec.inputs:
                errors += _check_value(spec.inputs[name], value, f"{where}.{name}", workflow)
    if not errors:
        if not any(NODES[n["class_type"]].output_node for n in workflow.values()):
            errors.append("no output node (SaveImage): ComfyUI would run nothing")
        errors += _cycles(workflow)
    return errors


def _cycles(workflow: Mapping) -> list[str]:
    state: dict[str, int] = {}  # 1 = on the path, 2 = done

    def visit(node_id: str) -> bool:
        if state.get(node_id) == 2:
            return False
        if state.get(node_id) == 1:
            return True
        state[node_id] = 1
        links = [v[0] for v in workflow[node_id]["inputs"].values() if isinstance(v, list)]
        if any(visit(source) for source in links):
            return True
        state[node_id] = 2
        return False

    return ["the links form a cycle"] if any(visit(n) for n in workflow) else []


# ----------------------------------------------------------------------------- workflows


def base_checkpoint_name(base: str) -> str:
    """The file name a ComfyUI user has the base model under (models/checkpoints)."""
    name = Path(base.rstrip("/")).name.replace(":", "-")
    return "sd_xl_base_1.0.safetensors" if name == "stable-diffusion-xl-base-1.0" else f"{name}.safetensors"


def workflow(loader: str, file_name: str, *, base_checkpoint: str, steps: int, prediction_type: str,
             prompt: str, width: int, height: int, seed: int = 0) -> dict:
    """A text-to-image graph for one export; `loader` is "checkpoint", "unet" or "lora"."""
    nodes: dict[str, dict] = {}

    def add(class_type: str, title: str, **inputs) -> str:
        node_id = str(len(nodes) + 1)
        nodes[node_id] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
        return node_id

    if loader == "checkpoint":
        ckpt = add("CheckpointLoaderSimple", "Load distilled checkpoint", ckpt_name=file_name)
        model = [ckpt, 0]
    elif loader in ("unet", "lora"):
        ckpt = add("CheckpointLoaderSimple", "Load base checkpoint (text encoders, VAE)",
                   ckpt_name=base_checkpoint)
        if loader == "unet":
            model = [add("UNETLoader", "Load distilled UNet", unet_name=file_name, weight_dtype="default"), 0]
        else:
            model = [add("LoraLoaderModelOnly", "Apply distilled LoRA", model=[ckpt, 0],
                         lora_name=file_name, strength_model=1.0), 0]
    else:
        raise ValueError(f"loader must be checkpoint, unet or lora, got {loader!r}")
    if prediction_type == "sample":  # the 1-step x0 model: its output is the image, not noise
        model = [add("ModelSamplingDiscrete", "x0 prediction", model=model, sampling="x0", zsnr=False), 0]
    elif prediction_type != "epsilon":
        raise ValueError(f"no ComfyUI workflow for prediction type {prediction_type!r}")
    positive = add("CLIPTextEncode", "Prompt", text=prompt, clip=[ckpt, 1])
    negative = add("CLIPTextEncode", "Negative prompt (unused at CFG 1)", text="", clip=[ckpt, 1])
    latent = add("EmptyLatentImage", "Image size", width=width, height=height, batch_size=1)
    sampled = add("KSampler", f"{steps}-step sampling", model=model, seed=seed, steps=steps, cfg=1.0,
                  sampler_name="euler", scheduler="sgm_uniform", positive=[positive, 0],
                  negative=[negative, 0], latent_image=[latent, 0], denoise=1.0)
    image = add("VAEDecode", "Decode", samples=[sampled, 0], vae=[ckpt, 2])
    add("SaveImage", "Save", images=[image, 0], filename_prefix=Path(file_name).stem)
    errors = validate(nodes)
    if errors:  # a bug here, not a user error
        raise AssertionError(errors)
    return nodes


def workflow_path(weights: Path) -> Path:
    """`<stem>_comfyui.json` next to `<stem>.safetensors`."""
    return weights.with_name(f"{weights.stem}_comfyui.json")


def write_workflows(cfg, written: list[Path]) -> list[Path]:
    """A workflow next to each exported weights file in `written` (train/export.py), prompting
    the run's first sample prompt at its training resolution."""
    loaders = {UNET_FORMAT: "unet", LORA_FORMAT: "lora", CHECKPOINT_FORMAT: "checkpoint"}
    paths = []
    for path in written:
        if path.suffix != ".safetensors":
            continue
        info = read_export_info(path)
        graph = workflow(loaders[info.format], path.name, base_checkpoint=base_checkpoint_name(cfg.model.base),
                         steps=info.num_inference_steps, prediction_type=info.prediction_type,
                         prompt=sample_prompts(cfg)[0], width=cfg.data.resolution, height=cfg.data.resolution)
        paths.append(write_text_atomic(workflow_path(path), json.dumps(graph, indent=2) + "\n"))
    return paths
