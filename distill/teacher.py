"""The frozen teacher of one distillation stage (METHOD.md §2 step 3).

A `Teacher` wraps any UNet that can serve as a teacher: the original base model, a previous
stage's student (in any prediction type, e.g. the x0-predicting 1-step model), or the
student's own UNet with its LoRA adapter switched off (METHOD.md §5, saves a full copy).
It answers two questions, both without gradients:

- `predict`: the model output at (x_t, t), with classifier-free guidance when asked,
  converted to the (x0, eps) pair every other piece of the framework works with;
- `target`: x_target, the point the teacher reaches by walking its own finer trailing grid
  from t down to the student's next timestep t' with deterministic DDIM `move` steps.

The teacher is never modified: freezing its parameters and putting it in eval mode is the
caller's business, because with `disable_adapter=True` the wrapped UNet is the student.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distill.conditioning import Conditioning
from distill.precision import compute_dtype
from distill.schedule import (
    CLEAN,
    PREDICTION_TYPES,
    NoiseSchedule,
    Prediction,
    move,
    teacher_subgrid,
    to_prediction,
)


@dataclass
class Teacher:
    """A frozen UNet used as teacher.

    unet: a diffusers `UNet2DConditionModel` (SDXL-style, `addition_embed_type="text_time"`).
    schedule: the noise schedule the UNet was trained with.
    prediction_type: what the UNet outputs ("epsilon", "sample" or "v_prediction").
    guidance_scale: classifier-free guidance weight w; guidance is applied when w > 1
        (diffusers' convention), with all-zero prompt embeddings as the unconditional branch.
    disable_adapter: run the UNet with its peft LoRA adapters disabled (the student's own
        base weights as teacher); they are enabled again after every call.
    """

    unet: nn.Module
    schedule: NoiseSchedule
    prediction_type: str = "epsilon"
    guidance_scale: float = 0.0
    disable_adapter: bool = False

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale > 1.0

    @contextmanager
    def _adapters_off(self):
        """Disable the LoRA adapters for the duration of a call (peft via diffusers'
        PeftAdapterMixin), and always enable them again, even if the forward raises."""
        if not self.disable_adapter:
            yield
            return
        self.unet.disable_adapters()
        try:
            yield
        finally:
            self.unet.enable_adapters()

    def _model_output(self, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The raw UNet output, guided if asked: uncond + w·(cond − uncond), as diffusers'
        pipelines apply it to the raw output, with both branches in one batched forward."""
        # Inputs go in the dtype the UNet computes in (a bf16 teacher with fp32 latents works;
        # one stored in bf16 and computed in fp32 takes fp32, distill/precision.py); an
        # autocast context set by the caller is left in charge of the compute dtype.
        dtype = compute_dtype(self.unet)
        if self.uses_guidance:
            # Unconditional first, like StableDiffusionXLPipeline's batch.
            both = cond.unconditional().cat(cond).to(device=x_t.device, dtype=dtype)
            out = self.unet(torch.cat([x_t, x_t]).to(dtype), torch.cat([t, t]),
                            **both.unet_kwargs()).sample.to(x_t.dtype)
            uncond, text = out.chunk(2)
            return uncond + self.guidance_scale * (text - uncond)
        cond = cond.to(device=x_t.device, dtype=dtype)
        return self.unet(x_t.to(dtype), t, **cond.unet_kwargs()).sample.to(x_t.dtype)

    @torch.no_grad()
    def predict(self, x_t: Tensor, t: Tensor | int, cond: Conditioning) -> Prediction:
        """The teacher's (x0, eps) at (x_t, t); t is an int or a per-sample (B,) tensor."""
        t = _per_sample(t, x_t)
        with self._adapters_off():
            out = self._model_output(x_t, t, cond)
        return to_prediction(self.schedule, x_t, out, t, self.prediction_type)

    @torch.no_grad()
    def target(self, x_t: Tensor, t: Tensor, t_next: Tensor, cond: Conditioning,
               teacher_steps: int) -> Tensor:
        """x_target of METHOD.md §2 step 3: `move` along the teacher's `teacher_steps`-step
        trailing grid from t down to t_next (−1: the clean sample), per sample."""
        return self.walk(x_t, t, t_next, cond, teacher_steps).x

    @torch.no_grad()
    def walk(self, x_t: Tensor, t: Tensor, t_next: Tensor, cond: Conditioning,
             teacher_steps: int) -> TeacherWalk:
        """The n-step walk of `target`, with the x0 of its last move (the x0 estimate that
        re-noising the discriminator inputs needs, METHOD.md §3).

        Samples walk in lockstep: step k runs one batched forward over every sample that still
        has a k-th teacher step, each at its own timestep, so mixed (t, t') pairs in a batch
        cost as many forwards as the longest walk, not one walk per distinct pair.
        """
        t_list = _per_sample(t, x_t).tolist()
        t_next_list = _per_sample(t_next, x_t).tolist()
        n = self.schedule.num_train_timesteps
        # walks[i] = the timesteps sample i is evaluated at, then where it ends.
        walks = [teacher_subgrid(a, b, teacher_steps, n) + [b] for a, b in zip(t_list, t_next_list)]
        # Intermediate points stay in at least fp32 whatever the caller's dtype.
        x = x_t.to(torch.promote_types(x_t.dtype, torch.float32), copy=True)
        x0 = torch.empty_like(x)
        for k in range(max(len(w) for w in walks) - 1):
            active = [i for i, w in enumerate(walks) if len(w) > k + 1]
            idx = torch.tensor(active, device=x_t.device)
            now = torch.tensor([walks[i][k] for i in active], device=x_t.device)
            nxt = torch.tensor([walks[i][k + 1] for i in active], device=x_t.device)
            pred = self.predict(x[idx], now, cond.index(idx.to(cond.prompt_embeds.device)))
            x[idx] = move(self.schedule, pred, nxt).to(x.dtype)
            x0[idx] = pred.x0.to(x.dtype)
        return TeacherWalk(x.to(x_t.dtype), x0.to(x_t.dtype))


@dataclass(frozen=True)
class TeacherWalk:
    """End point of the teacher's walk, and the x0 estimate of its last move."""

    x: Tensor
    x0: Tensor


def _per_sample(t: Tensor | int, like: Tensor) -> Tensor:
    """Timesteps as a (B,) long tensor on `like`'s device (an int is broadcast)."""
    t = torch.as_tensor(t, device=like.device).long().reshape(-1)
    if t.numel() == 1:
        t = t.expand(like.shape[0])
    if t.shape[0] != like.shape[0]:
        raise ValueError(f"{t.shape[0]} timesteps for a batch of {like.shape[0]}")
    return t


__all__ = ["CLEAN", "Teacher", "TeacherWalk"]
