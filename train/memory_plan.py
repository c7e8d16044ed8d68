"""How much memory each phase needs, predicted without allocating any (`--dry-run`).

Two halves:

- measurement (`measure_model`): parameter counts of every component and the bytes autograd
  saves for backward in one student forward and one discriminator-encoder forward, found by
  running the real diffusers modules under `FakeTensorMode` (shapes and dtypes only, no memory,
  any resolution) with a `saved_tensors_hooks` that sums the distinct storages saved.
  Parameters are not activations and are left out; autocast's low-precision copies of
  fp32 weights are real extra memory and are counted. Under gradient checkpointing the
  checkpointed block's internals are not kept: what stays is each block's inputs, plus the
  largest block's internals while it is recomputed in backward.
- the plan (`plan_phase`, pure arithmetic): per phase, bytes of student weights, gradients
  and optimizer states, the teacher (shared with the student or the base, or a separate copy
  in the compute dtype), discriminator backbone and heads with their states, the frozen text
  encoders and VAE, and activations; `fits` and `what_fits` say whether it fits a device and
  which options make it fit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch

GIB = 2**30
ADAM_BYTES = {"adamw": 8, "adamw8bit": 2}  # optimizer state bytes per trainable parameter
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "no": 4}


def parse_bytes(text: str) -> int:
    """'80GB', '80GiB', '24G', '512MB' → bytes (GB = GiB here: devices are sold in GiB)."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)I?B?\s*", text.upper())
    if not match:
        raise ValueError(f"not a memory size: {text!r} (e.g. 80GB)")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2] or " "))


# ----------------------------------------------------------------------------- what is measured


@dataclass(frozen=True)
class ModelMeasure:
    """Counts and activation bytes of one base at one resolution, batch and precision."""

    unet_params: int
    lora_params: int  # at the configured rank
    encoder_params: int  # the discriminator backbone: conv_in, embeddings, down and mid blocks
    text_params: int  # both text encoders
    vae_params: int
    head_params: dict[bool, int]  # conditional → parameters of all heads
    student_activations: dict[tuple[str, bool], int]  # (form, checkpointing) → bytes one forward (batch B) saves
    encoder_activations: dict[bool, int]  # checkpointing → bytes one encoder forward (batch B) saves
    head_activations: int  # heads on batch B (conditional width)


@dataclass(frozen=True)
class PlanOptions:
    """The knobs the plan varies (from the config, or tried by `what_fits`)."""

    mixed_precision: str = "no"  # no | bf16 | fp16: the compute dtype
    frozen_dtype: str = "fp32"  # storage dtype of every frozen UNet (base, teacher copies, a LoRA student's W) and the text encoders
    vae_dtype: str = "fp32"
    student_checkpointing: bool = False
    discriminator_checkpointing: bool = False
    backbone_trainable: bool = False
    optimizer: str = "adamw"  # adamw | adamw8bit
    shards: int = 1  # ZeRO-2 / FSDP world size: gradients and optimizer states split this many ways
    shard_weights: bool = False  # FSDP full shard: trainable weights split too


@dataclass(frozen=True)
class PhaseMemory:
    """Predicted bytes of one phase on one device."""

    phase: str
    student_weights: int
    student_grads: int
    optimizer_states: int
    teacher: int
    teacher_kind: str  # shared (LoRA adapter off / frozen base) | separate <dtype>
    discriminator_backbone: int  # weights, gradients and states of a trainable backbone (frozen: shared, 0)
    discriminator_heads: int  # heads with gradients and states
    frozen: int  # text encoders + VAE + the frozen base UNet (+ a LoRA student's own frozen W)
    activations: int
    checkpoint: int = 0  # bytes of one resumable checkpoint: what trains, with its optimizer states (not in total)

    @property
    def total(self) -> int:
        return (self.student_weights + self.student_grads + self.optimizer_states + self.teacher
                + self.discriminator_backbone + self.discriminator_heads + self.frozen + self.activations)


def plan_phase(m: ModelMeasure, *, name: str, kind: str, form: str, shared_teacher: bool,
               opts: PlanOptions, own_weights: bool = False) -> PhaseMemory:
    """Bytes of one phase (METHOD.md §5 forms; §4 discriminator) under `opts`. Pure arithmetic.

    own_weights: a LoRA student whose W is not the base's (a later stage, or after a merge)
    holds its own frozen copy of W, stored like every frozen UNet."""
    frozen_b = DTYPE_BYTES[opts.frozen_dtype]
    state_b = ADAM_BYTES[opts.optimizer]
    split = max(1, opts.shards)
    frozen = m.text_params * frozen_b + m.vae_params * DTYPE_BYTES[opts.vae_dtype]
    if form == "lora":
        trainable = m.lora_params
        weights = m.lora_params * 4
        own = own_weights and kind != "merge"  # a merge folds W into a new fp32 UNet instead
        frozen += m.unet_params * frozen_b * (2 if own else 1)  # the base (+ W under the adapter)
    else:
        trainable = m.unet_params
        weights = m.unet_params * 4 // (split if opts.shard_weights else 1)
        if kind != "merge":
            frozen += m.unet_params * frozen_b  # the base: frozen backbone source, stage-0 teacher
    if kind == "merge":
        return PhaseMemory(name, m.unet_params * 4, 0, 0, 0, "none", 0, 0, frozen, 0)
    grads = trainable * 4 // split
    states = trainable * state_b // split
    if shared_teacher:
        teacher, teacher_kind = 0, "shared"
    else:
        teacher, teacher_kind = m.unet_params * frozen_b, f"separate {opts.frozen_dtype}"
    activations = m.student_activations["lora" if form == "lora" else "full", opts.student_checkpointing]
    backbone = heads = 0
    if kind.startswith("adv"):
        conditional = kind == "adv_conditional"
        h = m.head_params[conditional]
        heads = h * (4 + 4 + state_b)
        enc = m.encoder_activations[opts.discriminator_checkpointing]
        if opts.backbone_trainable:
            backbone = m.encoder_params * (4 + (4 + state_b) // split)
            # D step: the backbone learns from [real; fake] (2B) and, conditional, x_t (B).
            d_step = enc * (3 if conditional else 2)
        else:
            d_step = 0  # frozen backbone: nothing saved but the heads' inputs
        g_step = enc  # gradients flow through the backbone to the student's output
        activations += max(d_step, g_step) + 2 * m.head_activations
    # A checkpoint holds the trainable weights and their optimizer states (train/checkpoint.py):
    # student, heads, a trainable backbone; never the frozen UNets (referenced by hash).
    d_trainable = (m.head_params[kind == "adv_conditional"] if kind.startswith("adv") else 0) + (
        m.encoder_params if kind.startswith("adv") and opts.backbone_trainable else 0)
    checkpoint = (trainable + d_trainable) * (4 + state_b)
    return PhaseMemory(name, weights, grads, states, teacher, teacher_kind, backbone, heads,
                       frozen, activations, checkpoint)


# Options tried, in order, until a phase fits: each is (label, change to the options).
FIT_OPTIONS: tuple[tuple[str, Callable[[PlanOptions], PlanOptions]], ...] = (
    ("student.gradient_checkpointing=true", lambda o: replace(o, student_checkpointing=True)),
    ("discriminator.gradient_checkpointing=true", lambda o: replace(o, discriminator_checkpointing=True)),
    ("discriminator.backbone_trainable=false", lambda o: replace(o, backbone_trainable=False)),
    ("optim.optimizer=adamw8bit", lambda o: replace(o, optimizer="adamw8bit")),
)


def what_fits(evaluate: Callable[[PlanOptions], PhaseMemory], opts: PlanOptions, device_bytes: int,
              max_gpus: int = 64) -> tuple[list[str], PhaseMemory]:
    """The options (cumulative, in FIT_OPTIONS order, then ZeRO-2 and FSDP over N GPUs) after
    which `evaluate(options).total` fits `device_bytes`; ([], plan) if it fits as configured,
    (["does not fit"...], best) if nothing does."""
    current = evaluate(opts)
    if current.total <= device_bytes:
        return [], current
    chosen: list[str] = []
    for label, change in FIT_OPTIONS:
        changed = change(opts)
        if changed == opts:
            continue
        opts, current = changed, evaluate(changed)
        chosen.append(label)
        if current.total <= device_bytes:
            return chosen, current
    for label, shard_weights in (("ZeRO-2", False), ("FSDP", True)):
        n = 2
        while n <= max_gpus:
            plan = evaluate(replace(opts, shards=n, shard_weights=shard_weights))
            if plan.total <= device_bytes:
                return [*chosen, f"{label} over {n} GPUs"], plan
            n *= 2
    return [*chosen, f"does not fit in {device_bytes / GIB:.0f} GiB even with FSDP over {max_gpus}"], current


def format_table(rows: Iterable[tuple[PhaseMemory, str]], device_bytes: int | None) -> str:
    """One line per phase, sizes in GiB."""
    head = (f"{'phase':<34s} {'weights':>7s} {'grads':>6s} {'optim':>6s} {'teacher':>7s} "
            f"{'D bb':>5s} {'D heads':>7s} {'frozen':>6s} {'activ':>6s} {'total':>6s} {'ckpt':>6s}  fits / what fits")
    lines = [head]
    for p, verdict in rows:
        cells = [p.student_weights, p.student_grads, p.optimizer_states, p.teacher,
                 p.discriminator_backbone, p.discriminator_heads, p.frozen, p.activations, p.total,
                 p.checkpoint]
        widths = [7, 6, 6, 7, 5, 7, 6, 6, 6, 6]
        lines.append(f"{p.phase:<34s} " + " ".join(f"{c / GIB:>{w}.2f}" for c, w in zip(cells, widths))
                     + f"  {verdict}")
    lines.append(f"(GiB; teacher: shared = the student's UNet with its adapter off or the frozen base; "
                 f"ckpt = one checkpoint on disk, not in total; device {device_bytes / GIB:.0f} GiB)"
                 if device_bytes else "(GiB; ckpt = one checkpoint on disk, not in total)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- measuring


class _SavedBytes:
    """Bytes of the distinct storages autograd saves for backward, parameters excluded.

    Under checkpointing (`checkpoint_call` as the modules' `_gradient_checkpointing_func`) a
    block's own saved tensors go to a per-call tally instead: only its inputs stay, and the
    largest tally is what recomputation needs at once."""

    def __init__(self, exclude: Iterable[torch.Tensor]):
        self.exclude = {_storage_key(t) for t in exclude}
        self.seen: set = set()
        self.total = 0
        self.largest_block = 0

    def _add(self, t: torch.Tensor, seen: set) -> int:
        key = _storage_key(t)
        if key in self.exclude or key in seen:
            return 0
        seen.add(key)
        return t.untyped_storage().nbytes()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.total += self._add(t, self.seen)
        return t

    def checkpoint_call(self, module, *args):
        for a in args:
            if isinstance(a, torch.Tensor):
                self.total += self._add(a, self.seen)
        inner: set = set()
        tally = [0]

        def pack(t):
            tally[0] += self._add(t, inner)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = module(*args)
        self.largest_block = max(self.largest_block, tally[0])
        return out


def _storage_key(t: torch.Tensor):
    return t.untyped_storage()._cdata


def saved_activation_bytes(module: torch.nn.Module, run: Callable[[], object], *,
                           checkpointing: bool, autocast_dtype: torch.dtype | None) -> int:
    """Bytes autograd keeps between `run()`'s forward and its backward (module and inputs
    must be fake tensors or meta-free real ones; nothing is computed for fake ones)."""
    counter = _SavedBytes(module.parameters())
    blocks = [m for m in module.modules() if hasattr(m, "gradient_checkpointing")]
    for m in blocks:
        m.gradient_checkpointing = checkpointing
        m._gradient_checkpointing_func = counter.checkpoint_call
    try:
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None), \
                torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            run()
    finally:
        for m in blocks:
            m.gradient_checkpointing = False
    return counter.total + counter.largest_block


def lora_parameter_count(unet: torch.nn.Module, rank: int) -> int:
    """rank·(in + out) per Linear, rank·(in·k·k + out) per Conv2d on the LoRA targets."""
    from distill.lora import lora_target_modules

    modules = dict(unet.named_modules())
    total = 0
    for name in lora_target_modules(unet):
        m = modules[name]
        if isinstance(m, torch.nn.Linear):
            total += rank * (m.in_features + m.out_features)
        else:
            total += rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
    return total


def measure_model(unet_config: dict, text_params: int, vae_params: int, *, latent_size: int,
                  batch_size: int, prompt_len: int, lora_rank: int, head_channels: int | None,
                  bucket_edges: list[int], multiscale: bool, autocast_dtype: torch.dtype | None,
                  frozen_dtype: torch.dtype = torch.float32) -> ModelMeasure:
    """Every count and activation size the plan needs, from the UNet's config alone (fake
    tensors: seconds at SDXL size, no memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from discriminator.model import Discriminator
    from distill.conditioning import Conditioning
    from distill.precision import store_frozen

    mode = FakeTensorMode()
    with mode:
        unet = _unet_in(unet_config, torch.float32)
        b, s, c = batch_size, latent_size, unet.config
        x = torch.randn(b, c.in_channels, s, s, requires_grad=True)
        t = torch.full((b,), 999)
        pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        cond = Conditioning(torch.randn(b, prompt_len, c.cross_attention_dim), torch.randn(b, pooled),
                            torch.full((b, 6), 1024.0))
        unet_params = sum(p.numel() for p in unet.parameters())
        lora = lora_parameter_count(unet, lora_rank)
        heads = {}
        for conditional in (False, True):
            d = Discriminator(unet, conditional=conditional, bucket_edges=bucket_edges,
                              multiscale=multiscale, backbone_trainable=False,
                              head_channels=head_channels, latent_size=s, share_weights=True)
            heads[conditional] = sum(p.numel() for p in d.heads.parameters())
        encoder_params = sum(p.numel() for p in d.backbone.parameters())
        # Full form: trainable fp32 weights (autocast's low-precision copies count). LoRA form:
        # the frozen base in its dtype, every layer's input kept for the adapters.
        frozen = unet if frozen_dtype == torch.float32 else _unet_in(unet_config, frozen_dtype)
        if frozen is not unet and autocast_dtype is None:
            # Stored in half precision, computed in fp32 (distill/precision.py): each layer's
            # upcast weights are kept for backward like activations, and counted as such. A
            # freshly built UNet's parameters require grad, and `store_frozen` leaves trainable
            # ones alone: frozen first, as the base is when it is loaded.
            store_frozen(frozen.requires_grad_(False), frozen_dtype, torch.float32)
            d = Discriminator(frozen, conditional=True, bucket_edges=bucket_edges, multiscale=multiscale,
                              backbone_trainable=False, head_channels=head_channels, latent_size=s,
                              share_weights=True)
        student = {}
        for form, model in (("full", unet), ("lora", frozen)):
            model.requires_grad_(True)
            for ckpt in (False, True):
                student[form, ckpt] = saved_activation_bytes(
                    model, lambda m=model: m(x, t, **cond.unet_kwargs()), checkpointing=ckpt,
                    autocast_dtype=autocast_dtype)
        for p in d.backbone.parameters():  # a trainable backbone (a shared one cannot be deep-copied)
            p.requires_grad_(True)
        encoder = {ckpt: saved_activation_bytes(d.backbone, lambda: d.backbone(x, t, cond),
                                                checkpointing=ckpt, autocast_dtype=autocast_dtype)
                   for ckpt in (False, True)}
        features = d.backbone(x.detach(), t, cond)
        head_act = saved_activation_bytes(d.heads, lambda: d.logits(features.cat(features), t),
                                          checkpointing=False, autocast_dtype=autocast_dtype)
    return ModelMeasure(unet_params, lora, encoder_params, text_params, vae_params, heads,
                        student, encoder, head_act)



def _unet_in(config: dict, dtype: torch.dtype):
    """A UNet2DConditionModel built directly in `dtype` (fake tensors cannot be cast in place)."""
    from diffusers import UNet2DConditionModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return UNet2DConditionModel(**config)
    finally:
        torch.set_default_dtype(default)


# ----------------------------------------------------------------------------- a config's plan

SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"


@dataclass(frozen=True)
class BaseArchitecture:
    """What the plan needs of a base model: its UNet config and the other components' sizes."""

    unet_config: dict
    text_params: int
    vae_params: int
    vae_downsample: int  # pixels per latent pixel (SDXL: 8)
    prompt_len: int  # tokens per prompt (77)


def base_architecture(base: str) -> BaseArchitecture | None:
    """From a diffusers folder's configs, or SDXL's published ones for its hub id; None when
    neither is at hand (an embedded digits base that is not built yet)."""
    import json
    from pathlib import Path

    from train.random_sdxl import build_components, sdxl_spec

    folder = Path(base)
    if (folder / "unet" / "config.json").is_file():
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        unet_config = json.loads((folder / "unet" / "config.json").read_text())
        unet_config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
        with torch.device("meta"):
            te1 = CLIPTextConfig.from_pretrained(folder / "text_encoder")
            te2 = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            modules = {"text_encoder": CLIPTextModel(te1), "text_encoder_2": CLIPTextModelWithProjection(te2),
                       "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))}
        prompt_len = te1.max_position_embeddings
    elif base.rstrip("/").endswith(SDXL_HUB_ID):
        spec = sdxl_spec()
        unet_config, prompt_len = spec.unet, spec.max_tokens
        modules = {name: m for name, m in build_components(spec, device="meta") if name != "unet"}
    else:
        return None
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    downsample = 2 ** (len(modules["vae"].config.block_out_channels) - 1)
    return BaseArchitecture(unet_config, count["text_encoder"] + count["text_encoder_2"], count["vae"],
                            downsample, prompt_len)


def config_options(cfg) -> PlanOptions:
    """The plan's options as a run config sets them."""
    return PlanOptions(
        mixed_precision=cfg.runtime.mixed_precision,
        frozen_dtype=_frozen_name(cfg),
        vae_dtype=cfg.data.vae_dtype,
        student_checkpointing=cfg.student.gradient_checkpointing,
        discriminator_checkpointing=cfg.discriminator.gradient_checkpointing,
        backbone_trainable=cfg.discriminator.backbone_trainable,
        optimizer=getattr(cfg.optim, "optimizer", "adamw"),
    )


def _frozen_name(cfg) -> str:
    """model.frozen_dtype with "auto" resolved (the mixed-precision dtype, fp32 for "no")."""
    name = getattr(cfg.model, "frozen_dtype", "fp32")
    if name == "auto":
        return {"no": "fp32"}.get(cfg.runtime.mixed_precision, cfg.runtime.mixed_precision)
    return name


def config_plan(cfg, arch: BaseArchitecture, device_bytes: int | None) -> list[tuple[PhaseMemory, str]]:
    """(plan, verdict) for every phase of the config's recipe, on one device of `device_bytes`."""
    from distill.phases import BASE, expand_recipe

    opts = config_options(cfg)
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opts.mixed_precision)
    frozen = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(opts.frozen_dtype, torch.float32)
    measure = measure_model(
        arch.unet_config, arch.text_params, arch.vae_params,
        latent_size=cfg.data.resolution // arch.vae_downsample, batch_size=cfg.data.batch_size,
        prompt_len=arch.prompt_len, lora_rank=cfg.student.lora_rank,
        head_channels=cfg.discriminator.head_channels or None,
        bucket_edges=list(cfg.discriminator.bucket_edges), multiscale=cfg.discriminator.multiscale,
        autocast_dtype=compute, frozen_dtype=frozen)
    rows = []
    plans = expand_recipe(cfg.stages)
    for plan in plans:
        # The base teacher is the base itself; a fresh LoRA's teacher is its own UNet, adapter off.
        shared = plan.teacher.stage == BASE or (plan.form == "lora" and plan.teacher.stage == plan.stage - 1)
        # A LoRA student's W is the base's only while nothing before it changed W.
        own = plan.form == "lora" and not all(p.form == "lora" and p.kind != "merge" for p in plans[:plan.index])

        def evaluate(o: PlanOptions, plan=plan, shared=shared, own=own) -> PhaseMemory:
            return plan_phase(measure, name=f"{plan.stage_name}/{plan.name} ({plan.form})", kind=plan.kind,
                              form=plan.form, shared_teacher=shared, opts=o, own_weights=own)

        if device_bytes is None:
            rows.append((evaluate(opts), ""))
            continue
        changes, fitted = what_fits(evaluate, opts, device_bytes)
        verdict = "fits" if not changes else f"needs {' + '.join(changes)} ({fitted.total / GIB:.1f})"
        rows.append((evaluate(opts), verdict))
    return rows
