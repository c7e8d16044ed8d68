"""The typed configuration of a distillation run, and how it is loaded.

Loading order (torchtitan style): the structured schema below → the YAML file → `dotted.key=value`
overrides → plain, validated dataclasses. Unknown keys and bad values fail here, before any
model loads, with the dotted key, the value and what is allowed ("did you mean" for near misses);
numbers must be finite and in range (a NaN learning rate would otherwise pass every `< 0` test
and fail inside the optimizer). `ConfigError` is a `UserError`: the CLIs print it on one line.
Each component later receives only its own slice (`cfg.discriminator`, `cfg.data`, ...).
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distill.phases import PhaseConfig, RecipeError, StageConfig, did_you_mean, expand_recipe
from train.errors import UserError

MIXED_PRECISION = ("no", "fp16", "bf16")
DTYPES = ("fp16", "bf16", "fp32")
FROZEN_DTYPES = ("auto", *DTYPES)
# YAML 1.1 reads these unquoted words as booleans (`mixed_precision: no` is False); for a
# string field they mean the word itself (`_keep_words`).
YAML_BOOL_WORDS = ("no", "off", "false", "n", "yes", "on", "true", "y")
PREDICTION_TYPES = ("auto", "epsilon", "v_prediction", "sample")
D_LOSSES = ("nonsaturating", "hinge")
D_REINIT = ("stage", "phase")
LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adamw", "adamw8bit")


FIX_CONFIG = "fix it in the config file or the dotted.key=value override"


class ConfigError(UserError, ValueError):
    """A config problem; `what` starts with the dotted key it concerns, `where` is the file."""

    def __init__(self, what: str, where: object = "", todo: str = FIX_CONFIG):
        super().__init__(what, where, todo)


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        hint = did_you_mean(value, allowed)
        if isinstance(value, bool) or str(value).lower() in YAML_BOOL_WORDS:
            hint += " (YAML reads unquoted no/off/yes/on as booleans: quote the value, e.g. 'no')"
        raise ConfigError(f"{name}: {value!r} is not one of {list(allowed)}{hint}")


def _finite(name: str, value) -> None:
    values = value if isinstance(value, (list, tuple)) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in values):
        raise ConfigError(f"{name}: must be a finite number, got {value}")


def _positive(obj, *names: str, allow_zero: bool = False) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None:
            continue
        _finite(name, value)
        if value < 0 or (value == 0 and not allow_zero):
            raise ConfigError(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _learning_rate(obj, *names: str) -> None:
    _positive(obj, *names)
    for name in names:
        value = getattr(obj, name)
        if value is not None and value > 1:
            raise ConfigError(f"{name}: a learning rate must be in (0, 1], got {value}")


EMBEDDED_SIZES = ("full", "tiny")


def embedded_base(base: str) -> tuple[str, int]:
    """(size, seed) of an embedded base `digits:<size>[:seed<N>]`: `digits:full` is seed 0's
    model, `digits:full:seed1` another teacher of the same size built from seed 1 (a base the
    digits preset was not tuned on)."""
    parts = base.split(":")
    if parts[0] != "digits" or not 2 <= len(parts) <= 3:
        raise ConfigError(f"base: {base!r} is not digits:<size>[:seed<N>] (e.g. digits:full, digits:full:seed1)")
    _choice("base (digits:<size>)", parts[1], EMBEDDED_SIZES)
    if len(parts) == 2:
        return parts[1], 0
    if not re.fullmatch(r"seed\d+", parts[2]):
        raise ConfigError(f"base: {parts[2]!r} in {base!r} is not seed<N> (e.g. digits:full:seed1)")
    return parts[1], int(parts[2][4:])


@dataclass
class ModelConfig:
    base: str = "digits:full"  # diffusers folder of the base model, or digits:full / digits:tiny[:seed<N>] (built on first use)
    cache_dir: str = ""  # cache for embedded models and shards; "" = $DISTILL_CACHE or ~/.cache/lightning-distill
    prediction_type: str = "auto"  # base UNet output: auto (its scheduler config) | epsilon | v_prediction | sample
    frozen_dtype: str = "auto"  # storage dtype of every frozen UNet (base, teacher copies, a LoRA student's weights) and the text encoders: auto (= runtime.mixed_precision's dtype, fp32 with "no") | fp32 | bf16 | fp16; held in bf16/fp16 and computed in fp32 (upcast layer by layer) when mixed_precision is "no"

    def __post_init__(self):
        _choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _choice("frozen_dtype", self.frozen_dtype, FROZEN_DTYPES)
        if not self.base:
            raise ConfigError("base: empty; give a diffusers model folder or digits:full / digits:tiny")
        if self.base.startswith("digits:"):
            embedded_base(self.base)


@dataclass
class StudentConfig:
    lora_rank: int = 64  # LoRA rank r (METHOD.md §5)
    lora_alpha: float = 64.0  # LoRA alpha; the update is scaled by alpha / r and alpha is stored in exports
    gradient_checkpointing: bool = False  # recompute activations in backward (needed at SDXL size)
    ema_decay: float = 0.0  # EMA of student weights per step (0 = off); validation/exports use the EMA

    def __post_init__(self):
        _positive(self, "lora_rank", "lora_alpha")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")


@dataclass
class DiscriminatorConfig:
    backbone_trainable: bool = False  # train the UNet-encoder backbone (paper) or keep it frozen (saves memory)
    multiscale: bool = False  # heads on every down block's output too, not only the mid block
    bucket_edges: list[int] = field(default_factory=lambda: [125, 375, 625])  # timestep bucket edges; [] = one head
    head_channels: int = 0  # width of the conv heads; 0 = the width of the features they read
    loss: str = "nonsaturating"  # nonsaturating (paper, softplus) | hinge
    r1_weight: float = 0.0  # weight of the R1 penalty on real inputs (0 = off)
    mse_weight: float = 0.0  # MSE to the teacher target mixed into the adversarial G loss (paper: 0)
    renoise_timesteps: list[int] = field(default_factory=lambda: [10, 250, 500, 750])  # t* choices
    renoise_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0, 1.0])  # early t* weights
    renoise_late_weights: list[float] = field(default_factory=lambda: [5.0, 1.0, 1.0, 1.0])  # t* weights later
    renoise_switch_step: int = 1000  # step within a phase at which the late weights take over
    d_steps_per_g_step: int = 1  # discriminator updates per student update
    reinit: str = "stage"  # stage: fresh per stage, heads/trainable backbone/Adam state carry across its phases (METHOD.md §4) | phase: fresh every phase
    gradient_checkpointing: bool = False  # recompute the backbone's activations in backward (trainable, or frozen: what the G step keeps to reach the student)

    def __post_init__(self):
        _choice("loss", self.loss, D_LOSSES)
        _choice("reinit", self.reinit, D_REINIT)
        _positive(self, "r1_weight", "mse_weight", "head_channels", "renoise_switch_step", allow_zero=True)
        _positive(self, "d_steps_per_g_step")
        if list(self.bucket_edges) != sorted(set(self.bucket_edges)) or any(
                not 0 < e < 1000 for e in self.bucket_edges):
            raise ConfigError(f"bucket_edges: must be strictly increasing timesteps in 1..999, got {self.bucket_edges}")
        for name in ("renoise_weights", "renoise_late_weights"):
            weights = getattr(self, name)
            _finite(name, list(weights))
            if len(weights) != len(self.renoise_timesteps) or any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ConfigError(f"{name}: need {len(self.renoise_timesteps)} non-negative weights "
                                  f"(one per renoise_timesteps entry) with a positive sum, got {weights}")
        if any(not 0 <= t <= 999 for t in self.renoise_timesteps):
            raise ConfigError(f"renoise_timesteps: must be in 0..999, got {self.renoise_timesteps}")


@dataclass
class OptimConfig:
    lr_mse: float = 1e-5  # student LR in mse and x0_convert phases (paper)
    lr_adv_lora: float = 1e-6  # student LR in adversarial phases with a LoRA student (paper)
    lr_adv_full: float = 5e-7  # student LR in adversarial phases with the full UNet (paper)
    discriminator_lr: float | None = None  # None = the student's LR in the same phase (paper)
    betas_mse: list[float] = field(default_factory=lambda: [0.9, 0.999])  # Adam betas, MSE phases
    betas_adv: list[float] = field(default_factory=lambda: [0.0, 0.99])  # Adam betas, adversarial phases (paper)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    warmup_steps: int = 0  # linear LR warm-up at the start of every phase, in steps
    lr_schedule: str = "constant"  # constant | cosine (decay to 0 over the phase)
    optimizer: str = "adamw"  # adamw (torch, 8 bytes of state per parameter) | adamw8bit (bitsandbytes, 2 bytes; CUDA only)

    def __post_init__(self):
        _learning_rate(self, "lr_mse", "lr_adv_lora", "lr_adv_full", "discriminator_lr")
        _positive(self, "weight_decay", "max_grad_norm", "warmup_steps", allow_zero=True)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        for name in ("betas_mse", "betas_adv"):
            betas = getattr(self, name)
            _finite(name, list(betas))
            if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
                raise ConfigError(f"{name}: need two values in [0, 1), got {betas}")


@dataclass
class DataConfig:
    train_shards: str = ""  # webdataset image shards (path, brace pattern); "" = embedded digits shards
    latent_shards: str = ""  # precomputed latent+text shards (scripts/precompute_latents.py); used if set
    resolution: int = 32  # training image side in pixels (SDXL: 1024)
    center_crop: bool = True  # centre crop, else random crop
    batch_size: int = 16  # samples per process per micro-step
    shuffle_buffer: int = 1000  # samples in the shuffle buffer
    num_workers: int = 0  # DataLoader worker processes per rank
    vae_dtype: str = "fp32"  # VAE encode dtype (fp32: the SDXL VAE overflows in fp16)

    def __post_init__(self):
        _positive(self, "resolution", "batch_size")
        _positive(self, "shuffle_buffer", "num_workers", allow_zero=True)
        _choice("vae_dtype", self.vae_dtype, DTYPES)
        if self.resolution % 8:  # SDXL's VAE factor; the base's own is checked when it is found
            raise ConfigError(f"resolution: must be a multiple of 8 (the SDXL VAE's downsampling "
                              f"factor), got {self.resolution}")


@dataclass
class RuntimeConfig:
    mixed_precision: str = "no"  # autocast: no | fp16 | bf16 (trainable weights stay fp32)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_nonfinite_steps: int = 10  # stop after this many skipped (non-finite) steps in a row
    max_skipped_fraction: float = 0.5  # a phase ending with more than this fraction of its steps skipped (non-finite) publishes no final: a one-line error (1 = never)
    nccl_timeout_s: int = 7200  # process-group timeout in seconds (rank-0 validation/export)
    fault_nonfinite_steps: list[int] = field(default_factory=list)  # fault injection (tests): global steps whose student loss is made NaN
    compile: bool = False  # torch.compile the student UNet and the discriminator (in place, keys unchanged)
    compile_backend: str = "inductor"  # torch.compile backend (inductor; eager/aot_eager to debug)

    def __post_init__(self):
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _positive(self, "gradient_accumulation_steps", "max_nonfinite_steps", "nccl_timeout_s")
        _finite("max_skipped_fraction", self.max_skipped_fraction)
        if not 0 <= self.max_skipped_fraction <= 1:
            raise ConfigError(f"max_skipped_fraction: must be in [0, 1] (1: never), got {self.max_skipped_fraction}")


@dataclass
class CheckpointConfig:
    every_steps: int = 500  # optimizer steps between resumable checkpoints within a phase
    keep_last: int = 2  # complete checkpoints kept per phase (older ones deleted)

    def __post_init__(self):
        _positive(self, "every_steps", "keep_last")


@dataclass
class ValidationConfig:
    every_steps: int = 500  # steps between validation grids (0 = only at the end of each phase)
    prompts: list[str] = field(default_factory=list)  # fixed prompts; [] = the embedded base's own (required for a folder base)
    images_per_prompt: int = 2  # images per prompt in the grid
    seed: int = 1234  # noise seed of the grid (fixed, so grids compare across steps)

    def __post_init__(self):
        _positive(self, "every_steps", allow_zero=True)
        _positive(self, "images_per_prompt")


@dataclass
class LoggingConfig:
    log_every_steps: int = 10  # steps between metrics.jsonl rows
    wandb: bool = False  # log to Weights & Biases (honours WANDB_MODE; offline works without network)
    wandb_project: str = "lightning-distill"  # wandb project name
    progress_bar: bool = True  # tqdm bar on the main process

    def __post_init__(self):
        _positive(self, "log_every_steps")


@dataclass
class ExportConfig:
    enabled: bool = True  # write exports at the end of each stage
    name: str = "digits_lightning"  # file prefix: <name>_<N>step_unet.safetensors, ...
    dtype: str = "fp16"  # dtype of exported weights
    lora_rank: int = 0  # rank of SVD-extracted LoRAs; 0 = student.lora_rank
    lora_names: str = "original"  # LoRA module names: original (kohya SDXL: lora_unet_input_blocks_…) | diffusers (lora_unet_down_blocks_…)
    single_file: bool = True  # also write <name>_<N>step.safetensors: UNet + the base's VAE and text encoders, original SDXL layout
    workflows: bool = True  # also write a ComfyUI workflow (API format) next to each checkpoint, UNet and LoRA
    model_card: bool = True  # keep export/README.md (model card) and <name>_<N>step_samples.png up to date

    def __post_init__(self):
        _choice("dtype", self.dtype, DTYPES)
        _choice("lora_names", self.lora_names, ("original", "diffusers"))
        _positive(self, "lora_rank", allow_zero=True)
        if not self.name or "/" in self.name:
            raise ConfigError(f"name: must be a non-empty file prefix without '/', got {self.name!r}")


@dataclass
class Config:
    output_dir: str = "runs/digits"  # run directory (config, checkpoints, samples, metrics, exports)
    seed: int = 0  # global seed; per-rank and per-step seeds derive from it
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: list[StageConfig] = field(default_factory=list)  # the recipe, in order (METHOD.md §2)
    student: StudentConfig = field(default_factory=StudentConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def __post_init__(self):
        if not self.output_dir:
            raise ConfigError("output_dir: must be set")
        if not self.validation.prompts and not self.model.base.startswith("digits:"):
            # Only an embedded base brings prompts (train/embedded.py): fail here, not at the
            # first validation grid after hours of training.
            raise ConfigError(f"validation.prompts: required unless model.base is an embedded "
                              f"digits model; {self.model.base} brings no prompts of its own")
        expand_recipe(self.stages)  # cross-stage checks (teacher chaining, skip levels, forms)


# ----------------------------------------------------------------------------- loading

def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Schema → YAML → dotlist overrides → validated dataclasses. Raises ConfigError, whose
    `where` names the file (and the overrides, when there are some)."""
    try:
        return _load_config(Path(path), list(overrides))
    except ConfigError as err:
        if err.where:
            raise
        where = f"{path}{' with overrides' if overrides else ''}"
        raise ConfigError(err.what, where, err.todo) from None


def _load_config(path: Path, overrides: list[str]) -> Config:
    if not path.is_file():
        raise ConfigError("config file not found", path, "give the path of a YAML config, e.g. configs/digits.yaml")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    except Exception as err:  # yaml's scanner and parser errors, undecodable bytes
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"not a readable YAML file: {first}", path, "fix the YAML syntax") from None
    if not isinstance(raw, dict):
        raise ConfigError("the top level must be a mapping of keys", path)
    _check_keys(Config, raw, "")
    _keep_words(Config, raw)
    quoted = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        is_str = _is_str_field(_check_dotted_key(key))
        if is_str and value.lower() in YAML_BOOL_WORDS:  # as `_keep_words` reads the YAML file
            item = f"{key}='{'no' if value.lower() in YAML_BOOL_WORDS[:4] else 'yes'}'"
        quoted.append(item)
    overrides = quoted
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), raw)
        merged.merge_with_dotlist(list(overrides))
        data = OmegaConf.to_container(merged, resolve=True, structured_config_mode=None)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or "?"
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None
    return _build(Config, data, "")


def config_to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _fields(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _dataclass_of(tp) -> type | None:
    """The dataclass a field holds, or the element dataclass of a list field."""
    if dataclasses.is_dataclass(tp):
        return tp
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _check_keys(cls, data, prefix: str) -> None:
    """Unknown keys anywhere in the YAML, reported with their full dotted path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<top>'}: expected a mapping, got {data!r}")
    fields = _fields(cls)
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key; allowed: {sorted(fields)}"
                              f"{did_you_mean(key, list(fields))}")
        inner = _dataclass_of(fields[key])
        if inner is None or value is None:
            continue
        if typing.get_origin(fields[key]) is list:
            if not isinstance(value, list):
                raise ConfigError(f"{prefix}{key}: expected a list, got {value!r}")
            for i, item in enumerate(value):
                _check_keys(inner, item, f"{prefix}{key}.{i}.")
        else:
            _check_keys(inner, value, f"{prefix}{key}.")


def _is_str_field(tp) -> bool:
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp))


def _keep_words(cls, data: dict) -> None:
    """In place: a YAML boolean in a string field becomes the word it was written as, as far as
    it can be told (`no`/`off`/`false` → "no", `yes`/`on`/`true` → "yes"), so `mixed_precision:
    no` means "no" as the schema's choices spell it, not False."""
    for name, tp in _fields(cls).items():
        value = data.get(name)
        inner = _dataclass_of(tp)
        if isinstance(value, bool) and _is_str_field(tp):
            data[name] = "yes" if value else "no"
        elif inner is not None and isinstance(value, dict):
            _keep_words(inner, value)
        elif inner is not None and isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    _keep_words(inner, item)


def _check_dotted_key(key: str):
    """Raise ConfigError for an unknown dotted key; return the type of the field it names."""
    cls, prefix = Config, ""
    parts = key.split(".")
    i = 0
    while i < len(parts):
        fields = _fields(cls)
        name = parts[i]
        if name not in fields:
            raise ConfigError(f"{prefix}{name}: unknown key; allowed: {sorted(fields)}"
                              f"{did_you_mean(name, list(fields))}")
        inner = _dataclass_of(fields[name])
        prefix += name + "."
        if inner is None:
            return fields[name]
        if typing.get_origin(fields[name]) is list:
            i += 1  # the list index
            if i < len(parts):
                prefix += parts[i] + "."
        cls = inner
        i += 1


def _build(cls, data: dict, prefix: str):
    """Plain dataclasses from the merged container, so __post_init__ validation runs with the
    dotted path of the failing field in its message."""
    kwargs = {}
    for name, tp in _fields(cls).items():
        if name not in data:
            continue
        value, inner = data[name], _dataclass_of(tp)
        if inner is not None and typing.get_origin(tp) is list:
            value = [_build(inner, item, f"{prefix}{name}.{i}.") for i, item in enumerate(value)]
        elif inner is not None:
            value = _build(inner, value, f"{prefix}{name}.")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (ConfigError, RecipeError) as err:
        message = err.what if isinstance(err, ConfigError) else str(err)
        if not message.startswith("stages."):
            message = prefix + message
        raise ConfigError(message) from None


__all__ = ["Config", "ConfigError", "PhaseConfig", "StageConfig", "load_config", "config_to_yaml"]
