"""The stage's discriminator on disk (train/models.py): what a phase trained continues in the
stage's next adversarial phase, weights and Adam moments, heads kept per form."""

import torch

from discriminator.model import Discriminator
from distill.phases import PhaseConfig, StageConfig, expand_recipe
from distill.testing import random_conditioning, tiny_unet
from train.layout import RunLayout
from train.models import discriminator_state, load_discriminator_state


def _disc(conditional: bool, seed: int, trainable: bool = True) -> tuple[Discriminator, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    disc = Discriminator(tiny_unet(seed=0), conditional=conditional, bucket_edges=[500], multiscale=False,
                         backbone_trainable=trainable, head_channels=None)
    return disc, torch.optim.AdamW(disc.trainable_parameters(), lr=1e-2, betas=(0.0, 0.99))


def _train(disc, optimizer, steps: int = 2):
    cond = random_conditioning(2)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 900])
    for _ in range(steps):
        context = disc.encode(x, t, cond) if disc.conditional else None
        disc(x, t, cond, context).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def test_state_round_trips_weights_and_adam_moments():
    disc, opt = _disc(conditional=False, seed=0)
    _train(disc, opt)
    state = discriminator_state(disc, opt, {})
    fresh, fresh_opt = _disc(conditional=False, seed=1)  # other random heads
    assert load_discriminator_state(fresh, fresh_opt, state) == len(disc.trainable_parameters())
    for (name, a), b in zip(disc.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(disc.trainable_parameters(), fresh.trainable_parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[a][key], fresh_opt.state[b][key])
        assert float(fresh_opt.state[b]["step"]) == 2.0
    _train(fresh, fresh_opt, steps=1)  # Adam continues from the loaded moments
    assert float(fresh_opt.state[fresh.trainable_parameters()[0]]["step"]) == 3.0


def test_heads_are_kept_per_form_and_the_backbone_is_shared():
    cond_disc, cond_opt = _disc(conditional=True, seed=0)
    _train(cond_disc, cond_opt)
    state = discriminator_state(cond_disc, cond_opt, {})
    uncond, uncond_opt = _disc(conditional=False, seed=1)
    heads_before = [p.detach().clone() for p in uncond.heads.parameters()]
    carried = load_discriminator_state(uncond, uncond_opt, state)
    assert carried == len(list(uncond.backbone.parameters()))  # the backbone, not the 2×-wide heads
    assert all(torch.equal(a, b) for a, b in zip(heads_before, uncond.heads.parameters()))
    for a, b in zip(cond_disc.backbone.parameters(), uncond.backbone.parameters()):
        assert torch.equal(a, b)
    merged = discriminator_state(uncond, uncond_opt, state)
    assert any(k.startswith("heads.conditional.") for k in merged)
    assert any(k.startswith("heads.unconditional.") for k in merged)


def test_a_frozen_backbone_is_not_saved():
    disc, opt = _disc(conditional=False, seed=0, trainable=False)
    _train(disc, opt)
    assert all(k.startswith(("heads.", "adam.heads.")) for k in discriminator_state(disc, opt, {}))


def test_the_source_is_the_latest_adversarial_phase_of_the_same_stage(tmp_path):
    stages = [StageConfig(teacher_steps=8, student_steps=4, phases=[
        PhaseConfig(kind="adv_conditional", steps=1, form="lora"),
        PhaseConfig(kind="adv_unconditional", steps=1, form="lora"),
        PhaseConfig(kind="merge", steps=0, form="lora"),
        PhaseConfig(kind="adv_unconditional", steps=1, form="full")]),
        StageConfig(teacher_steps=4, student_steps=2, phases=[PhaseConfig(kind="adv_conditional", steps=1)])]
    plans = expand_recipe(stages)
    layout = RunLayout.for_stages(tmp_path, stages)
    cond, uncond, merge, full, next_stage = plans
    assert layout.discriminator_source(cond, plans) is None
    assert layout.discriminator_source(uncond, plans) == layout.phase_final(cond)
    assert layout.discriminator_source(full, plans) == layout.phase_final(uncond)  # across the merge
    assert layout.discriminator_source(next_stage, plans) is None  # re-initialised per stage
