"""One training step as MOCA's loop runs it: EMA first, then targets, losses, clip, AdamW;
fp16 with MOCA's grad scaler or bf16; the two mu_MSD updates of a step."""

import math

import pytest
import torch

from moca_eval.distributed import DistInfo
from moca_eval.pretrain.assign import cosine_to_codebook
from moca_eval.pretrain.model import MOCA
from moca_eval.pretrain.schedules import teacher_momentum
from moca_eval.pretrain.train import _Run, build_optimizer, train_step
from moca_eval.runtime import Runtime, backward, optimizer_step, resolve_precision


def _linear_with_gradient(x):
    """A parameter ``w`` (zeros) and the loss ``w . x``, whose gradient is ``x``."""
    w = torch.nn.Parameter(torch.zeros(3))
    return w, (w * x).sum()


@pytest.mark.parametrize("scaled", [False, True])
def test_gradient_is_clipped_to_norm_01_before_the_adamw_step(scaled):
    """``clip_grad_norm_(params, 0.1)`` (MOCA's default): gradient (30, 40, 0), norm 50 ->
    (0.06, 0.08, 0); with the fp16 scaler, unscaled first (as MOCA's NativeScaler)."""
    w, loss = _linear_with_gradient(torch.tensor([30.0, 40.0, 0.0]))
    optimizer = torch.optim.AdamW([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0) if scaled else None
    backward(loss, scaler)
    optimizer_step(torch.nn.ParameterList([w]), optimizer, clip_grad=0.1, scaler=scaler)
    clipped = torch.tensor([0.06, 0.08, 0.0])
    assert torch.allclose(w.grad, clipped, atol=1e-7)
    assert torch.allclose(optimizer.state[w]["exp_avg"], 0.1 * clipped, atol=1e-8)  # (1 - beta1) g
    assert torch.allclose(optimizer.state[w]["exp_avg_sq"], 0.001 * clipped**2, atol=1e-10)
    if scaled:
        assert scaler.get_scale() == 65536.0  # finite gradients: no back-off


def test_no_clipping_when_off():
    w, loss = _linear_with_gradient(torch.tensor([30.0, 40.0, 0.0]))
    loss.backward()
    optimizer_step(torch.nn.ParameterList([w]), torch.optim.AdamW([w]), clip_grad=None)
    assert torch.equal(w.grad, torch.tensor([30.0, 40.0, 0.0]))


@pytest.mark.parametrize(
    ("precision", "device", "bf16", "expected"),
    [("auto", "cpu", False, "fp32"), ("auto", "cuda", True, "bf16"), ("auto", "cuda", False, "fp16"),
     ("fp16", "cuda", True, "fp16"), ("bf16", "cpu", False, "bf16"), ("fp32", "cuda", True, "fp32")],
)
def test_precision_auto_is_bf16_on_gpus_that_have_it(precision, device, bf16, expected):
    assert resolve_precision(precision, torch.device(device), bf16_supported=bf16) == expected


def _micro_run(cfg):
    torch.manual_seed(0)
    model = MOCA(cfg)
    with torch.no_grad():  # a student that differs from its teacher
        for p in model.encoder.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)
    rt = Runtime(torch.device("cpu"), "fp32", DistInfo())
    return _Run(cfg, rt, model, model, build_optimizer(model, cfg), loader=None, run_dir=None)


def test_teacher_ema_comes_before_the_forward_with_this_steps_momentum(micro_cfg):
    """MOCA's ``extract_targets`` updates the teacher from the student as it is before the
    step's optimizer step (so the saved teacher lacks the last step's student)."""
    run = _micro_run(micro_cfg(momentum=0.9, momentum_end=0.99))
    teacher = {k: v.clone() for k, v in run.model.encoder_teacher.named_parameters()}
    student = {k: v.detach().clone() for k, v in run.model.encoder.named_parameters()}
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = 0.25
    train_step(run, x[:4], x[4:], step=0, t=t)
    m = teacher_momentum(run.cfg, t)
    for name, param in run.model.encoder_teacher.named_parameters():
        if name == "pos_embed":
            continue
        assert torch.allclose(param, m * teacher[name] + (1 - m) * student[name], atol=1e-7), name
    moved = run.model.encoder.blocks[0].attn.qkv.weight
    assert not torch.allclose(moved, student["blocks.0.attn.qkv.weight"])  # the step did happen


def test_a_step_updates_mu_once_per_view_from_the_teachers_tokens(micro_cfg):
    """From mu = 0.5: mu = 0.99^2 * 0.5 + 0.0099 gap(view 1) + 0.01 gap(view 2); both views
    are assigned at tau = 0.05 (the value before the step)."""
    cfg = micro_cfg()
    torch.manual_seed(0)
    model = MOCA(cfg)
    gen = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(4, 3, 32, 32, generator=gen), torch.randn(4, 3, 32, 32, generator=gen)
    words = model.bow_extractor.codebook.words.clone()
    gaps = []
    with torch.no_grad():
        for x in (x1, x2):  # as MOCA: one teacher forward and one assign_words per view
            sims = cosine_to_codebook(model.encoder_teacher.forward_features(x)[:, 1:], words)
            gaps.append(float((sims.max(-1).values - sims.mean(-1)).mean()))
    out = model(x1, x2, generator=torch.Generator().manual_seed(0))
    assert out.tau == pytest.approx(0.05)
    expected = 0.99**2 * 0.5 + 0.99 * 0.01 * gaps[0] + 0.01 * gaps[1]
    assert math.isclose(float(model.bow_extractor.mu_msd), expected, rel_tol=1e-6)
    mean_update = 0.99 * 0.5 + 0.01 * (gaps[0] + gaps[1]) / 2  # the old, once-per-step rule
    assert abs(expected - mean_update) > 1e-4
    assert float(model.bow_extractor.num_updates) == 1.0
