"""The model card `export/README.md` (Hugging Face conventions) and the sample grids it shows.

The card is written from what is in `export/` (each file's safetensors metadata says what it is)
and the run's resolved config: YAML front matter (`base_model` when the base is a Hub id,
`library_name: diffusers`, `tags`, `license` when the base's own card states one,
`pipeline_tag: text-to-image`), a table of the files with the loaders each is for, the
diffusers snippet per file kind as the released SDXL-Lightning card gives it, the sampler
settings, the recipe (stages, phases, key hyper-parameters), one sample grid per step count
rendered from the exported UNet through the diffusers pipeline, the LoRAs' approximation error,
and `RUN/evaluation.md` verbatim when the run has one (e.g. `python -m train.digits.evaluate … >
RUN/evaluation.md`).

train/export.py rewrites it after each stage's exports; `python -m train.export RUN_DIR
--card-only` rewrites it alone.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
import yaml

from train.config import Config
from train.embedded import resolve_base, validation_prompts
from train.export_info import (
    CHECKPOINT_FORMAT,
    LORA_FORMAT,
    UNET_FORMAT,
    ExportInfo,
    read_export_info,
)
from train.files import write_text_atomic
from train.generate import render, to_tensor
from train.pipeline import load_pipeline
from train.single_file import encoders_share_a_width
from train.validation import save_grid

CARD = "README.md"
MAX_SAMPLE_PROMPTS = 10  # one row of at most this many images per step count
MAX_TILE_PX = 256  # sample tiles are shrunk to this side (SDXL renders 1024 px)
EVALUATION_FILE = "evaluation.md"
LOADERS = {
    UNET_FORMAT: "diffusers: `UNet2DConditionModel.from_config(base, subfolder=\"unet\")` + "
                 "`load_state_dict(load_file(file))`; ComfyUI: UNETLoader",
    LORA_FORMAT: "diffusers: `pipe.load_lora_weights(file); pipe.fuse_lora()`; ComfyUI "
                 "LoraLoaderModelOnly; A1111 `<lora:…:1>`; kohya `sdxl_merge_lora.py`, "
                 "`--network_weights`",
    CHECKPOINT_FORMAT: "ComfyUI CheckpointLoaderSimple; A1111 checkpoint; diffusers "
                       "`StableDiffusionXLPipeline.from_single_file(file, config=base)`",
}


def sample_prompts(cfg: Config) -> list[str]:
    """The run's validation prompts (an embedded model's own when the config names none)."""
    return validation_prompts(cfg.model, cfg.validation)


def samples_path(export_dir: Path, cfg: Config, steps: int) -> Path:
    return export_dir / f"{cfg.export.name}_{steps}step_samples.png"


@torch.no_grad()
def write_samples(unet_export: Path, cfg: Config) -> Path:
    """`<name>_<N>step_samples.png`: one row, the run's prompts, rendered from the exported UNet
    file by train.generate (the diffusers pipeline, Euler on the trailing grid, guidance 0)."""
    cuda = torch.cuda.is_available()
    info = read_export_info(unet_export)
    pipe = load_pipeline(resolve_base(cfg.model), unet_export, device="cuda" if cuda else "cpu",
                         dtype=torch.float16 if cuda else torch.float32)
    # one prompt at a time (a batch of ten 1024 px SDXL decodes is heavy), each from the same seed
    images = [render(pipe, [prompt], info.num_inference_steps, cfg.validation.seed)[0]
              for prompt in sample_prompts(cfg)[:MAX_SAMPLE_PROMPTS]]
    side = min(images[0].width, MAX_TILE_PX)
    images = [im if im.width == side else im.resize((side, side)) for im in images]
    path = samples_path(unet_export.parent, cfg, info.num_inference_steps)
    save_grid(to_tensor(images), path, columns=len(images))
    return path


# ----------------------------------------------------------------------------- the base


def hub_id(base: str) -> str | None:
    """`owner/name` when the base is named by its Hugging Face Hub id, else None."""
    looks_like_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", base) is not None
    return base if looks_like_id and not Path(base).exists() else None


def base_card_metadata(folder: Path) -> dict:
    """The YAML front matter of the base folder's own README.md ({} if it has none)."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    match = re.match(r"---\s*\n(.*?)\n---\s*\n", readme.read_text(encoding="utf-8"), re.S)
    try:
        meta = yaml.safe_load(match.group(1)) if match else {}
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _local_base(cfg: Config) -> Path | None:
    """The base folder, or None where it is not on this machine (e.g. --card-only elsewhere)."""
    try:
        return resolve_base(cfg.model)
    except (FileNotFoundError, OSError):
        return None


def _base_reference(cfg: Config) -> str:
    """What the snippets pass as `base`."""
    base = cfg.model.base
    if hub_id(base):
        return base
    if base.startswith("digits:"):
        return f"path/to/digits-model-{base.split(':', 1)[1].replace(':', '-')}"
    return f"path/to/{Path(base.rstrip('/')).name}"


# ----------------------------------------------------------------------------- sections


def _front_matter(cfg: Config, infos: list[ExportInfo]) -> str:
    meta: dict = {}
    if hub_id(cfg.model.base):
        meta["base_model"] = cfg.model.base
    meta["library_name"] = "diffusers"
    base = _local_base(cfg)
    license_ = base_card_metadata(base).get("license") if base else None
    if license_:
        meta["license"] = license_
    meta["pipeline_tag"] = "text-to-image"
    tags = ["text-to-image", "stable-diffusion-xl", "sdxl-lightning", "diffusers", "lightning-distill"]
    if any(i.format == LORA_FORMAT for i in infos):
        tags.append("lora")
    meta["tags"] = tags
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _what(info: ExportInfo) -> str:
    x0 = " x0-prediction (set `prediction_type=\"sample\"`)," if info.prediction_type == "sample" else ""
    kind = {UNET_FORMAT: "full UNet, diffusers keys",
            LORA_FORMAT: f"LoRA of the base, rank {info.lora_rank}, {info.lora_names or 'original'} "
                         "(kohya SDXL) module names",
            CHECKPOINT_FORMAT: "single-file checkpoint (original SDXL layout: UNet + the base's VAE "
                               "and text encoders)"}[info.format]
    return f"{info.num_inference_steps}-step{x0} {kind}"


def _files_table(export_dir: Path, infos: dict[str, ExportInfo]) -> str:
    rows = ["| file | what | load with |", "|---|---|---|"]
    for path in sorted(p for p in export_dir.iterdir() if p.is_file() and p.name != CARD):
        if path.name in infos:
            info = infos[path.name]
            rows.append(f"| `{path.name}` | {_what(info)} | {LOADERS[info.format]} |")
        elif path.name.endswith("_comfyui.json"):
            weights = path.name[: -len("_comfyui.json")] + ".safetensors"
            rows.append(f"| `{path.name}` | ComfyUI workflow (API format) for `{weights}` | "
                        "ComfyUI: load it, put the weights in its models folder |")
        elif path.name.endswith("_lora_report.json"):
            rows.append(f"| `{path.name}` | how the LoRA was made and its approximation error | — |")
        elif path.name.endswith("_samples.png"):
            rows.append(f"| `{path.name}` | sample grid (below) | — |")
        elif path.suffix not in (".tmp",):
            rows.append(f"| `{path.name}` | | |")
    return "\n".join(rows)


def _snippet(kind: str, info: ExportInfo, base: str, shared_width: bool) -> str:
    """The released SDXL-Lightning card's diffusers code, for one of our files."""
    steps, name = info.num_inference_steps, info.path.name
    x0 = ', prediction_type="sample"' if info.prediction_type == "sample" else ""
    imports = {UNET_FORMAT: "StableDiffusionXLPipeline, UNet2DConditionModel, EulerDiscreteScheduler",
               LORA_FORMAT: "StableDiffusionXLPipeline, EulerDiscreteScheduler",
               CHECKPOINT_FORMAT: "StableDiffusionXLPipeline, EulerDiscreteScheduler"}[kind]
    head = f"import torch\nfrom diffusers import {imports}\n"
    if kind == UNET_FORMAT:
        head += "from safetensors.torch import load_file\n"
    if kind == CHECKPOINT_FORMAT and shared_width:
        head += "from transformers import CLIPTextModelWithProjection\n"
    head += f'\nbase = "{base}"\ndevice, dtype = "cuda", torch.float16\n'
    if kind == UNET_FORMAT:
        load = ('unet = UNet2DConditionModel.from_config(base, subfolder="unet").to(device, dtype)\n'
                f'unet.load_state_dict(load_file("{name}", device=device))\n'
                "pipe = StableDiffusionXLPipeline.from_pretrained(base, unet=unet, torch_dtype=dtype).to(device)\n")
    elif kind == LORA_FORMAT:
        load = ("pipe = StableDiffusionXLPipeline.from_pretrained(base, torch_dtype=dtype).to(device)\n"
                f'pipe.load_lora_weights("{name}")\npipe.fuse_lora()\n')
    elif shared_width:  # diffusers tells the text encoders apart by width (train/single_file.py)
        load = ("# this base's two text encoders are equally wide, which diffusers' from_single_file\n"
                "# cannot tell apart: pass the second one\n"
                'text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2")\n'
                f'pipe = StableDiffusionXLPipeline.from_single_file("{name}", config=base, torch_dtype=dtype,\n'
                "                                                 text_encoder_2=text_encoder_2).to(device, dtype)\n")
    else:
        load = (f'pipe = StableDiffusionXLPipeline.from_single_file("{name}", config=base, '
                "torch_dtype=dtype).to(device)\n")
    tail = ("pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, "
            f'timestep_spacing="trailing"{x0})\n'
            f'pipe("{{prompt}}", num_inference_steps={steps}, guidance_scale=0).images[0].save("output.png")\n')
    return "```python\n" + head + load + tail + "```"


def _usage(infos: list[ExportInfo], base: str, prompt: str, shared_width: bool) -> str:
    parts = []
    titles = {UNET_FORMAT: "Full UNet", LORA_FORMAT: "LoRA", CHECKPOINT_FORMAT: "Single-file checkpoint"}
    for kind, title in titles.items():
        of_kind = [i for i in infos if i.format == kind]
        for info in _representatives(of_kind):
            label = f"{title}, {_steps(info.num_inference_steps)}"
            parts.append(f"### {label}\n\n" + _snippet(kind, info, base, shared_width).replace("{prompt}", prompt))
    return "\n\n".join(parts)


def _shared_width(cfg: Config) -> bool:
    base = _local_base(cfg)
    return base is not None and encoders_share_a_width(base)


def _steps(n: int) -> str:
    return f"{n} step{'s' if n != 1 else ''}"


def _representatives(infos: list[ExportInfo]) -> list[ExportInfo]:
    """One epsilon file (the 4-step one if present, else the fewest steps) and every x0 file."""
    eps = sorted((i for i in infos if i.prediction_type != "sample"),
                 key=lambda i: (i.num_inference_steps != 4, i.num_inference_steps))
    return eps[:1] + [i for i in infos if i.prediction_type == "sample"]


def _recipe(cfg: Config) -> str:
    rows = ["| stage | teacher → student steps | teacher CFG | skip-level teacher | phases (kind: steps, form) |",
            "|---|---|---|---|---|"]
    for i, stage in enumerate(cfg.stages):
        phases = "; ".join(f"{p.kind}: {p.steps}, {p.form}" + (" (skip-level)" if p.teacher == "skip_level" else "")
                           for p in stage.phases)
        rows.append(f"| {i} | {stage.teacher_steps} → {stage.student_steps} | {stage.guidance_scale:g} | "
                    f"{stage.skip_level_steps or '—'} | {phases} |")
    keys = {"student": cfg.student, "optim": cfg.optim, "discriminator": cfg.discriminator}
    lines = [f"- `{group}.{k}`: {json.dumps(v)}" for group, sub in keys.items()
             for k, v in dataclasses.asdict(sub).items()]
    lines += [f"- `data.resolution`: {cfg.data.resolution}, `data.batch_size`: {cfg.data.batch_size} per process, "
              f"`runtime.mixed_precision`: {cfg.runtime.mixed_precision}, "
              f"`runtime.gradient_accumulation_steps`: {cfg.runtime.gradient_accumulation_steps}, "
              f"`seed`: {cfg.seed}"]
    return "\n".join(rows) + "\n\nKey hyper-parameters (the full resolved config is in every file's " \
        "safetensors metadata, key `config`):\n\n" + "\n".join(lines)


def _lora_errors(export_dir: Path) -> str:
    rows = []
    for path in sorted(export_dir.glob("*_lora_report.json")):
        report = json.loads(path.read_text())
        rows.append(f"| `{report.get('file', path.name)}` | {report['source']} | "
                    f"{report['overall_rel_error']:.3g} | {'yes' if report.get('exact') else 'no'} |")
    if not rows:
        return ""
    return ("| LoRA | made from | relative error vs the full UNet | exact |\n|---|---|---|---|\n"
            + "\n".join(rows))


# ----------------------------------------------------------------------------- the card


def write_model_card(run_dir: Path, cfg: Config) -> Path:
    """(Re)write `RUN/export/README.md` from the files in `export/` and the run's config."""
    export_dir = Path(run_dir) / "export"
    infos = {}
    for path in sorted(export_dir.glob("*.safetensors")):
        try:
            infos[path.name] = read_export_info(path)
        except ValueError:
            continue  # a file this framework did not write: listed, not described
    ordered = sorted(infos.values(), key=lambda i: (-i.num_inference_steps, i.format, i.path.name))
    steps = sorted({i.num_inference_steps for i in ordered}, reverse=True)
    base, prompts = _base_reference(cfg), sample_prompts(cfg)
    x0_steps = sorted({i.num_inference_steps for i in ordered if i.prediction_type == "sample"})
    sections = [
        _front_matter(cfg, ordered),
        f"# {cfg.export.name}\n\nFew-step text-to-image model{'s' if len(steps) > 1 else ''} "
        f"({', '.join(map(str, steps))} step{'s' if steps != [1] else ''}) distilled from "
        f"`{cfg.model.base}` by progressive adversarial diffusion distillation, the SDXL-Lightning "
        "method ([arXiv:2402.13929](https://arxiv.org/abs/2402.13929)), with lightning-distill. "
        "Every file is meant for the step count in its name.",
        "## Files\n\n" + _files_table(export_dir, infos),
        "## Sampler settings\n\n"
        "- Euler (`EulerDiscreteScheduler`) on the **trailing** timestep grid "
        "(`timestep_spacing=\"trailing\"`); in ComfyUI `euler` with the `sgm_uniform` scheduler.\n"
        "- **Guidance off**: `guidance_scale=0` in diffusers, CFG 1.0 in ComfyUI / A1111.\n"
        "- `num_inference_steps` = the step count in the file name (also in its metadata, "
        "`num_inference_steps`).\n"
        + (f"- The {', '.join(map(str, x0_steps))}-step model predicts **x0** (the image), not noise: "
           "diffusers needs `prediction_type=\"sample\"` in the scheduler, ComfyUI a "
           "`ModelSamplingDiscrete` node with sampling `x0` (its workflow has one); loaders without "
           "such a switch sample it wrongly.\n" if x0_steps else ""),
        f"## Use with diffusers\n\n`base` is the base model's diffusers folder (`{cfg.model.base}`).\n\n"
        + _usage(ordered, base, prompts[0], _shared_width(cfg)),
        "## Use with ComfyUI\n\nEach `*_comfyui.json` is a workflow in ComfyUI's API format for the "
        "file of the same name: put checkpoints in `models/checkpoints`, UNets in "
        "`models/diffusion_models`, LoRAs in `models/loras` (UNet and LoRA workflows also load the "
        "base checkpoint for the text encoders and VAE).",
    ]
    grids = [(n, samples_path(export_dir, cfg, n)) for n in steps]
    grids = [(n, p) for n, p in grids if p.is_file()]
    if grids:
        shown = prompts[:MAX_SAMPLE_PROMPTS]
        sections.append(
            "## Samples\n\nRendered from the exported UNet files through the diffusers pipeline "
            f"(seed {cfg.validation.seed}), prompts left to right: " + "; ".join(f"“{p}”" for p in shown)
            + ".\n\n" + "\n\n".join(f"**{_steps(n)}**\n\n![{_steps(n)}]({p.name})" for n, p in grids))
    sections.append("## How they were made\n\n" + _recipe(cfg))
    errors = _lora_errors(export_dir)
    if errors:
        sections.append("### LoRAs\n\n" + errors)
    evaluation = Path(run_dir) / EVALUATION_FILE
    if evaluation.is_file():
        sections.append("## Evaluation\n\n" + evaluation.read_text(encoding="utf-8").strip())
    return write_text_atomic(export_dir / CARD, "\n\n".join(s.rstrip() for s in sections) + "\n")
