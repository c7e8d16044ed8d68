"""The student of METHOD.md §2 step 4 and §5: a UNet, what its output means, and its move.

A student is a diffusers `UNet2DConditionModel` plus what its output means (`prediction_type`).
The LoRA form's adapter mechanics live in distill/lora.py; the losses in distill/losses.py.

Pure tensors in, tensors out: no files, devices or ranks are chosen here.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers import UNet2DConditionModel
from torch import Tensor, nn

from distill.conditioning import Conditioning
from distill.schedule import NoiseSchedule, Prediction, move, to_prediction


def trainable_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer owns: LoRA only after `add_lora`, all after `merge_lora`."""
    return [p for p in unet.parameters() if p.requires_grad]


# --------------------------------------------------------------------------- the student


@dataclass(frozen=True)
class StudentStep:
    """One student move (METHOD.md §2 step 4): the end point x_hat and the prediction u."""

    x_hat: Tensor
    pred: Prediction


@dataclass(frozen=True)
class Student:
    """A UNet and the parametrisation of its output ("epsilon", "sample" or "v_prediction")."""

    unet: UNet2DConditionModel
    prediction_type: str = "epsilon"

    def predict(self, schedule: NoiseSchedule, x_t: Tensor, t: Tensor,
                cond: Conditioning) -> Prediction:
        """u = student(x_t, t, c), expressed as (x0, eps)."""
        output = unet_output(self.unet, x_t, t, cond)
        return to_prediction(schedule, x_t, output, t, self.prediction_type)

    def step(self, schedule: NoiseSchedule, x_t: Tensor, t: Tensor, t_next: Tensor,
             cond: Conditioning) -> StudentStep:
        """x_hat = move(x_t, u, t, t') (METHOD.md §2 step 4); t' = −1 gives x_hat = x0(u)."""
        pred = self.predict(schedule, x_t, t, cond)
        return StudentStep(move(schedule, pred, t_next), pred)


def unet_output(unet: nn.Module, x_t: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
    """The raw UNet output for (x_t, t, c), in the UNet's own parametrisation."""
    return unet(x_t, t, **cond.unet_kwargs()).sample


def switch_to_x0(student: Student) -> Student:
    """The same UNet, now read as predicting x0 ("sample") (METHOD.md §3 x0_convert).

    The architecture is unchanged; only the meaning of its output changes, which the
    x0-conversion phase then teaches it. Exports of the result carry prediction_type="sample".
    """
    if student.prediction_type == "sample":
        raise ValueError("the student already predicts x0")
    return Student(student.unet, "sample")
