"""Learning-rate, teacher-momentum and weight-decay schedules; AdamW parameter groups."""

import math

import pytest

from moca_eval.pretrain.config import PretrainConfig
from moca_eval.pretrain.schedules import cosine, learning_rate, teacher_momentum, weight_decay

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
