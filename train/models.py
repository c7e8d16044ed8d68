"""Loading the base model and persisting the student between phases and stages.

A student on disk (`stages/<stage>/<phase>/final/`, `stages/<stage>/final/`) is:
  unet.safetensors   the full UNet weights W in plain diffusers keys (fp32)
  lora.safetensors   the LoRA adapter on top of W, if the student is in LoRA form (peft keys)
  student.json       prediction type, LoRA rank/alpha/targets, where it came from
  manifest.json      every file's size and hash, written last (train/manifest.py)
Every file is written to a temporary directory that is renamed when complete, so a crash
never leaves a torn final behind. Weights with a NaN or Inf are never written (the phase's
checkpoints stay), and a final is verified against its manifest and checked for finite
weights whenever it is loaded (`load_student_tensors`): a damaged one raises `DamagedFile`,
never reaches training or an export (train/recovery.py rebuilds it).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from discriminator.model import Discriminator
from distill.lora import (
    add_lora,
    has_lora,
    load_lora_state_dict,
    lora_from_adapter,
    lora_settings,
    lora_state_dict,
)
from distill.precision import store_frozen
from distill.schedule import NoiseSchedule
from train.config import ModelConfig
from train.errors import DamagedFile, Diverged
from train.files import atomic_dir
from train.manifest import (
    MANIFEST_FILE,
    describe_nonfinite,
    manifest_problems,
    nonfinite_names,
    safetensors_problem,
)
from train.tensor_files import LazyTensors, MappedTensors, NonFiniteTensors, write_safetensors
from train.text import TextEncoders, load_text_encoders

STUDENT_FILE = "student.json"
DISCRIMINATOR_FILE = "discriminator.safetensors"
ADAM_STATE = ("step", "exp_avg", "exp_avg_sq")
REBUILD_FINAL = "re-run the training command: it sets the damaged final aside and rebuilds it"
# Config dtype names → torch dtypes ("no" is runtime.mixed_precision's "off": fp32 compute).
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    return TORCH_DTYPES[name]


@dataclass(frozen=True)
class Precision:
    """How frozen weights are held and computed: stored in `frozen` (model.frozen_dtype),
    computed in `compute` (runtime.mixed_precision; fp32 for "no"). Where they differ and
    compute is fp32, each layer upcasts its weights while it runs (distill/precision.py)."""

    frozen: torch.dtype
    compute: torch.dtype

    @classmethod
    def of(cls, model_cfg: ModelConfig, mixed_precision: str = "no") -> Precision:
        compute = torch_dtype(mixed_precision)
        frozen = compute if model_cfg.frozen_dtype == "auto" else torch_dtype(model_cfg.frozen_dtype)
        return cls(frozen, compute)

    @property
    def layer_compute(self) -> torch.dtype:
        """The dtype a frozen layer computes in: under autocast (bf16/fp16) the stored dtype and
        autocast decide; with fp32 compute every layer upcasts to fp32."""
        return torch.float32 if self.compute == torch.float32 else self.frozen

    def hold(self, model: torch.nn.Module) -> torch.nn.Module:
        """Hold `model`'s frozen weights in this precision (in place)."""
        return store_frozen(model, self.frozen, self.layer_compute)


@dataclass
class BaseModel:
    """The frozen parts of the original base model, shared by every phase."""

    path: Path
    unet: UNet2DConditionModel  # frozen, stored in precision.frozen: teacher of stage 0, discriminator backbone source
    vae: AutoencoderKL
    text: TextEncoders
    schedule: NoiseSchedule
    prediction_type: str  # of the base UNet's output
    scheduler_config: dict
    precision: Precision = Precision(torch.float32, torch.float32)


def load_base(path: Path, model_cfg: ModelConfig, device: torch.device, vae_dtype: torch.dtype,
              text: bool = True, mixed_precision: str = "no") -> BaseModel:
    """The base's frozen UNet and text encoders stored in model.frozen_dtype (loaded straight
    into it: no fp32 copy on the way), the VAE in `vae_dtype` (data.vae_dtype: the SDXL VAE
    overflows in fp16)."""
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    prediction_type = model_cfg.prediction_type
    if prediction_type == "auto":
        prediction_type = scheduler_config.get("prediction_type", "epsilon")
    precision = Precision.of(model_cfg, mixed_precision)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=precision.frozen)
    precision.hold(unet.requires_grad_(False).eval().to(device))
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=vae_dtype)
    vae.requires_grad_(False).eval().to(device)
    encoders = load_text_encoders(path, device=device, dtype=precision.frozen) if text else None
    if encoders is not None:
        precision.hold(encoders.text_encoder)
        precision.hold(encoders.text_encoder_2)
    return BaseModel(path, unet, vae, encoders, NoiseSchedule.from_scheduler_config(scheduler_config),
                     prediction_type, scheduler_config, precision)


def plain_state_dict(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """W in plain diffusers keys, whether or not a peft adapter is injected (adapter dropped),
    as fp32 copies (small models and tests; `save_student` streams instead)."""
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in plain_weights(unet).items()}


def plain_weights(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """W in plain diffusers keys, the module's own tensors (no copy; adapter dropped)."""
    return {key.replace(".base_layer.", "."): value for key, value in unet.state_dict().items()
            if "lora_" not in key}


def fresh_unet(base: BaseModel) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_config(base.unet.config)


def assign_tensors(model: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]]) -> torch.nn.Module:
    """Fill a model built on the meta device with (state-dict key, tensor) pairs, one at a time
    (the tensors become the weights: no second copy). Every tensor must be given."""
    modules = dict(model.named_modules())
    for key, value in tensors:
        owner, _, name = key.rpartition(".")
        module = modules[owner]
        if name in module._parameters:
            module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
        elif name in module._buffers:
            module._buffers[name] = value
        else:
            raise KeyError(f"{key}: not a parameter or buffer of {type(model).__name__}")
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{len(left)} tensors were not given, e.g. {left[0]}")
    return model


def unet_copy(unet: UNet2DConditionModel, dtype: torch.dtype) -> UNet2DConditionModel:
    """A UNet with its own weights: `unet`'s, cast to `dtype`, made tensor by tensor, so the
    peak is the copy itself beside `unet` (a deep copy then a cast would hold both of the
    copy's dtypes at once). A full-UNet student from a bf16-stored base is its fp32 copy."""
    with torch.device("meta"):
        twin = UNet2DConditionModel.from_config(unet.config)
    assign_tensors(twin, ((k, v.detach().to(dtype, copy=True)) for k, v in unet.state_dict().items()))
    return twin.to(unet.device)


def shared_unet(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """A second UNet (its own modules) whose weights are the same tensors as `unet`'s: no
    memory. For a LoRA student on the frozen base (issue #16): peft wraps the twin's modules,
    the optimizer owns only the adapter, and nothing writes the shared weights. Never merge a
    LoRA into it in place (that would write into the base)."""
    with torch.device("meta"):
        twin = UNet2DConditionModel.from_config(unet.config)
    twin.load_state_dict(unet.state_dict(), assign=True)
    if any(t.is_meta for t in [*twin.parameters(), *twin.buffers()]):
        raise RuntimeError("shared_unet: a tensor outside the state dict stayed on the meta device")
    return twin.requires_grad_(False).to(unet.device)


@dataclass(frozen=True)
class SavedStudent:
    path: Path
    prediction_type: str
    lora_rank: int  # 0 = no adapter
    lora_alpha: float


def save_student(unet: UNet2DConditionModel, prediction_type: str, path: Path, origin: str,
                 discriminator: Mapping[str, torch.Tensor] | None = None,
                 weights: Mapping[str, torch.Tensor] | None = None) -> None:
    """Write a student atomically (temp dir + manifest + rename). Main process only.

    discriminator: the stage's discriminator state after this phase (`discriminator_state`),
    saved beside the student so the stage's next adversarial phase continues it.
    weights: where W comes from when not from `unet`'s own tensors: a LoRA student's W is
    frozen, possibly stored in half precision, so its exact fp32 values come from where it was
    loaded (`student_start_weights`). W is written tensor by tensor, in fp32.
    Raises `Diverged` instead of writing non-finite weights."""
    lora = {k: v.detach().cpu().float().contiguous() for k, v in lora_state_dict(unet).items()} \
        if has_lora(unet) else {}
    bad = nonfinite_names(lora) + nonfinite_names(dict(discriminator or {}))
    if bad:
        raise _diverged(origin, bad, path)
    with atomic_dir(path) as tmp:
        try:
            write_safetensors(tmp / "unet.safetensors", weights if weights is not None else plain_weights(unet),
                              dtype=torch.float32)
        except NonFiniteTensors as err:
            raise _diverged(origin, err.names, path) from None
        if discriminator:
            save_file(dict(discriminator), tmp / DISCRIMINATOR_FILE)
        meta = {"prediction_type": prediction_type, "origin": origin, "lora": None}
        if lora:
            settings = lora_settings(unet)
            save_file(lora, tmp / "lora.safetensors")
            meta["lora"] = {"rank": settings.rank, "alpha": settings.alpha,
                            "target_modules": list(settings.target_modules)}
        (tmp / STUDENT_FILE).write_text(json.dumps(meta, indent=2))


def _diverged(origin: str, bad: list[str], path: Path) -> Diverged:
    return Diverged(f"the student after {origin} has {describe_nonfinite(bad)}", path,
                    "nothing was written and the phase's checkpoints are kept: lower the "
                    "learning rate (or check the data) and re-run")


def base_unet_files(base_dir: Path) -> list[Path]:
    """The base UNet's weights files: diffusers' standard name, sharded or not (no variants)."""
    folder = Path(base_dir) / "unet"
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    single = folder / "diffusion_pytorch_model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"{folder}: no diffusion_pytorch_model.safetensors")


def student_start_weights(start: Path | None, base: BaseModel) -> Mapping[str, torch.Tensor]:
    """W of a phase's start, read lazily in fp32: the start final's own file, or the base's."""
    if start is not None:
        return load_student_tensors(start)[1]
    return MappedTensors(LazyTensors(base_unet_files(base.path)), lambda _, v: v.float(), torch.float32)


def read_student(path: Path) -> SavedStudent:
    meta = json.loads((path / STUDENT_FILE).read_text())
    lora = meta["lora"] or {}
    return SavedStudent(path, meta["prediction_type"], lora.get("rank", 0), lora.get("alpha", 0.0))


def is_complete(path: Path) -> bool:
    """Published (a folder appears only complete, by rename); whether it is still intact is
    `student_problems`."""
    return Path(path).is_dir()


def student_problems(path: Path) -> list[str]:
    """What is wrong with a saved student ([] = intact): its manifest first, then whether its
    weights parse and are finite (a NaN written by a version without the write-time check)."""
    problems = manifest_problems(path)
    if problems:
        return problems
    return [p for f in sorted(Path(path).glob("*.safetensors")) if (p := safetensors_problem(f))]


def load_student_tensors(path: Path) -> tuple[SavedStudent, Mapping[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A verified student's metadata, UNet weights (read lazily, one tensor at a time:
    `train/tensor_files.py`) and LoRA tensors ({} without an adapter).

    Raises `DamagedFile` when it fails its manifest or holds non-finite weights (checked tensor
    by tensor by `student_problems`)."""
    problems = student_problems(path)
    if problems:
        raise DamagedFile(f"damaged student: {problems[0]}", path, REBUILD_FINAL)
    saved = read_student(path)
    lora = load_file(path / "lora.safetensors") if saved.lora_rank else {}
    bad = nonfinite_names(lora)
    if bad:
        raise DamagedFile(f"student with {describe_nonfinite(bad)}", path, REBUILD_FINAL)
    return saved, LazyTensors(path / "unet.safetensors"), lora


def folded_weights(weights: Mapping[str, torch.Tensor], lora: Mapping[str, torch.Tensor],
                   alpha: float) -> Mapping[str, torch.Tensor]:
    """W + ΔW of a saved adapter, fp32, computed per tensor when read (METHOD.md §5 merge)."""
    layers = {f"{module}.weight": layer for module, layer in lora_from_adapter(lora, alpha).items()}

    def fold(key: str, value: torch.Tensor) -> torch.Tensor:
        value = value.float()
        layer = layers.get(key)
        return value if layer is None else value + layer.delta().reshape(value.shape)

    return MappedTensors(weights, fold, torch.float32)


def load_student(path: Path, base: BaseModel, *, fold_lora: bool,
                 dtype: torch.dtype = torch.float32) -> tuple[UNet2DConditionModel, str]:
    """A verified saved student as a UNet on the base's device, its W in `dtype` (frozen
    parameters; the caller decides what trains), read tensor by tensor: the peak is the UNet
    itself. With fold_lora its adapter is folded into W, else it is attached (trainable)."""
    saved, weights, lora = load_student_tensors(path)
    if saved.lora_rank and fold_lora:
        weights = folded_weights(weights, lora, saved.lora_alpha)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(base.unet.config)
    assign_tensors(unet, ((k, weights[k].to(dtype)) for k in weights))
    if saved.lora_rank and not fold_lora:
        add_lora(unet, saved.lora_rank, saved.lora_alpha)
        load_lora_state_dict(unet, lora)
    return unet.to(base.unet.device), saved.prediction_type


def link_or_copy(src: Path, dst: Path) -> None:
    """Make dst a complete copy of the verified student folder src (hard links where possible)."""
    problems = student_problems(src)
    if problems:
        raise DamagedFile(f"damaged student: {problems[0]}", src, REBUILD_FINAL)
    with atomic_dir(dst) as tmp:
        for f in src.iterdir():
            if f.name == MANIFEST_FILE:
                continue  # publish records dst's own
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)


# ----------------------------------------------------------------------------- discriminator state


def _stage_key(name: str, conditional: bool) -> str:
    """A discriminator parameter's key in the stage state: heads are kept per form (the
    conditional heads read twice the channels), the backbone is shared by both forms."""
    if name.startswith("heads."):
        return f"heads.{'conditional' if conditional else 'unconditional'}.{name[len('heads.'):]}"
    return name


def discriminator_state(disc: Discriminator, optimizer: torch.optim.Optimizer,
                        carried: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stage's discriminator after this phase: what earlier phases carried (e.g. the other
    form's heads), updated with this phase's trainable parameters and their Adam moments."""
    state = dict(carried)
    adam = getattr(optimizer, "optimizer", optimizer).state  # accelerate wraps the optimizer
    trainable = {id(p) for p in disc.trainable_parameters()}
    for name, param in disc.named_parameters():
        if id(param) not in trainable:
            continue  # a frozen backbone is the base's: nothing to carry
        key = _stage_key(name, disc.conditional)
        state[key] = param.detach().cpu().float().contiguous()
        for field_name in ADAM_STATE:
            if field_name in adam.get(param, {}):
                state[f"adam.{key}.{field_name}"] = adam[param][field_name].detach().cpu().float().reshape(-1)
    return state


def read_discriminator_state(final: Path | None) -> dict[str, torch.Tensor]:
    """The discriminator state saved with a phase final ({} when there is none)."""
    if final is None or not (final / DISCRIMINATOR_FILE).is_file():
        return {}
    return load_file(final / DISCRIMINATOR_FILE)


def load_discriminator_state(disc: Discriminator, optimizer: torch.optim.Optimizer,
                             state: Mapping[str, torch.Tensor]) -> int:
    """Continue a stage's discriminator: its trainable parameters that the state holds take the
    saved weights and Adam moments (call before accelerate prepares the optimizer). Returns how
    many parameters were carried."""
    trainable = {id(p) for p in disc.trainable_parameters()}
    carried = 0
    for name, param in disc.named_parameters():
        key = _stage_key(name, disc.conditional)
        if key not in state or id(param) not in trainable:
            continue
        with torch.no_grad():
            param.copy_(state[key].to(param.device, param.dtype))
        moments = {f: state[f"adam.{key}.{f}"] for f in ADAM_STATE if f"adam.{key}.{f}" in state}
        if len(moments) == len(ADAM_STATE):
            optimizer.state[param] = {
                "step": moments["step"].reshape(()).clone(),
                "exp_avg": moments["exp_avg"].reshape(param.shape).to(param.device).clone(),
                "exp_avg_sq": moments["exp_avg_sq"].reshape(param.shape).to(param.device).clone()}
        carried += 1
    return carried
