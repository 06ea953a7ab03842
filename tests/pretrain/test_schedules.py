"""Learning-rate, teacher-momentum and weight-decay schedules; AdamW parameter groups."""

import math

import pytest
import torch

from moca_eval.pretrain.config import PretrainConfig, preset
from moca_eval.pretrain.schedules import (
    apply_schedules,
    cosine,
    learning_rate,
    teacher_momentum,
    weight_decay,
)

CFG = PretrainConfig(epochs=100, warmup_epochs=10, batch_size=512, blr=1e-4, lr_decay_epochs_mul=1.0)


def test_lr_warms_up_linearly_from_zero_to_blr_times_batch_over_256():
    peak = 1e-4 * 512 / 256
    assert learning_rate(CFG, 0.0) == 0.0
    assert math.isclose(learning_rate(CFG, 5.0), peak / 2)
    assert math.isclose(learning_rate(CFG, 10.0), peak)


def test_lr_cosine_reaches_min_lr_at_the_end():
    peak = 1e-4 * 512 / 256
    assert math.isclose(learning_rate(CFG, 55.0), peak / 2)  # half-way through the cosine
    assert learning_rate(CFG, 100.0) == 0.0


def test_lr_decay_epochs_mul_stretches_the_cosine():
    cfg = PretrainConfig(epochs=200, warmup_epochs=30, batch_size=2048)  # MOCA: 1.25 x epochs
    peak = 1.5e-4 * 2048 / 256
    expected = 0.5 * (1 + math.cos(math.pi * (200 - 30) / (250 - 30))) * peak
    assert math.isclose(learning_rate(cfg, 200.0), expected)


def test_teacher_momentum_goes_from_099_to_1_on_a_cosine():
    assert math.isclose(teacher_momentum(CFG, 0.0), 0.99)
    assert math.isclose(teacher_momentum(CFG, 50.0), 0.995)
    assert math.isclose(teacher_momentum(CFG, 100.0), 1.0)


def test_weight_decay_constant_or_cosine():
    assert weight_decay(CFG, 37.0) == 0.05
    cfg = PretrainConfig(epochs=100, weight_decay_end=0.2)
    assert math.isclose(weight_decay(cfg, 50.0), 0.125)


@pytest.mark.parametrize("t", [0.0, 3.0, 10.0])
def test_cosine_endpoints(t):
    assert cosine(1.0, 0.0, 0.0, 10.0) == 1.0
    assert cosine(1.0, 0.0, 10.0 + t, 10.0) == 0.0


# MOCA's util/misc.py: half_cycle_cosine_schedule(end, start, e, n) = end - 0.5 (1 + cos(pi e / n))
# (end - start), used for the momentum (alpha -> 1) and, with --weight_decay_end, the weight decay.
# At epoch 50 of 200: 0.5 (1 + cos(pi / 4)) = 0.8535533905932737.
@pytest.mark.parametrize(
    ("name", "momentum", "decay"),
    [
        # paper, Table 11: 0.99 -> 1 and a constant 0.05
        ("vit_base", {0: 0.99, 50: 1 - 0.8535533905932737 * 0.01, 100: 0.995, 200: 1.0},
         {0: 0.05, 50: 0.05, 100: 0.05, 200: 0.05}),
        # official script + README (v1.0): --alpha 0.994, --weight_decay 0.05 --weight_decay_end 0.2
        ("vit_base_release", {0: 0.994, 50: 1 - 0.8535533905932737 * 0.006, 100: 0.997, 200: 1.0},
         {0: 0.05, 50: 0.2 - 0.8535533905932737 * 0.15, 100: 0.125, 200: 0.2}),
    ],
)
def test_presets_momentum_and_weight_decay_schedules(name, momentum, decay):
    cfg = preset(name)
    assert cfg.clip_grad == 0.1  # the script's --clip_grad default (the paper is silent)
    for t, value in momentum.items():
        assert math.isclose(teacher_momentum(cfg, t), value, rel_tol=1e-12), (t, value)
    for t, value in decay.items():
        assert math.isclose(weight_decay(cfg, t), value, rel_tol=1e-12), (t, value)
    assert math.isclose(momentum[50], {"vit_base": 0.9914644660940673,
                                       "vit_base_release": 0.9948786796564404}[name], rel_tol=1e-12)


def test_weight_decay_schedule_reaches_the_decay_groups_only():
    cfg = preset("vit_base_release")
    params = [torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(4)]
    groups = [{"params": [p], "is_wgen": w, "use_wd": d, "weight_decay": 0.05 if d else 0.0}
              for p, (w, d) in zip(params, [(False, False), (False, True), (True, False), (True, True)])]
    optimizer = torch.optim.AdamW(groups)
    lr = apply_schedules(optimizer, cfg, 100.0)
    # MOCA: the wgen groups keep weight_decay_wgen (0.05) and their constant lr_wgen (1e-4)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.125, 0.0, 0.05]
    assert [g["lr"] for g in optimizer.param_groups] == [lr, lr, 1e-4, 1e-4]
