"""Teacher assignments, the adaptive temperature and the border-ignoring average."""

import math

import torch

from moca_eval.pretrain.assign import (
    TeacherAssigner,
    assignments,
    border_average,
    cosine_to_codebook,
    max_minus_mean,
)
from moca_eval.pretrain.codebook import OnlineCodebook


def test_assignment_is_softmax_of_cosine_over_tau_by_hand():
    words = torch.tensor([[1.0, 0.0], [0.0, 1.0], [math.sqrt(0.5), math.sqrt(0.5)]])
    token = torch.tensor([[[2.0, 0.0]]])  # cosines: 1, 0, 0.7071
    sims = cosine_to_codebook(token, words)
    assert torch.allclose(sims, torch.tensor([[[1.0, 0.0, math.sqrt(0.5)]]]))
    tau = 0.05
    logits = [1.0 / tau, 0.0, math.sqrt(0.5) / tau]
    denom = sum(math.exp(v) for v in logits)
    expected = torch.tensor([[[math.exp(v) / denom for v in logits]]])
    assert torch.allclose(assignments(sims, tau), expected)
    # gap: max - mean = 1 - (1 + 0 + 0.7071) / 3
    assert math.isclose(float(max_minus_mean(sims)), 1 - (1 + math.sqrt(0.5)) / 3, rel_tol=1e-6)


def test_tau_is_mu_over_inv_delta_and_mu_is_an_ema_of_the_gap():
    assigner = TeacherAssigner(OnlineCodebook(8, 4, num_new=4), inv_delta=10.0, decay=0.99)
    assert math.isclose(float(assigner.tau), 0.05, rel_tol=1e-6)  # mu starts at 0.5, as in MOCA
    assigner.update_mu(torch.tensor(0.8))
    assert math.isclose(float(assigner.mu_msd), 0.99 * 0.5 + 0.01 * 0.8, rel_tol=1e-6)
    assigner.update_mu(torch.tensor(0.2))
    mu = 0.99 * (0.99 * 0.5 + 0.01 * 0.8) + 0.01 * 0.2
    assert math.isclose(float(assigner.mu_msd), mu, rel_tol=1e-6)
    assert math.isclose(float(assigner.tau), mu / 10.0, rel_tol=1e-6)


def test_forward_uses_the_current_tau_and_reports_the_gap():
    torch.manual_seed(0)
    assigner = TeacherAssigner(OnlineCodebook(8, 4, num_new=4))
    tokens = torch.randn(2, 9, 4)
    words = assigner.codebook.words
    codes, gap = assigner(tokens, words)
    sims = torch.nn.functional.normalize(tokens, dim=-1) @ words.t()
    assert torch.allclose(codes, torch.softmax(sims / 0.05, dim=-1), atol=1e-6)
    assert torch.allclose(gap, (sims.max(-1).values - sims.mean(-1)).mean())
    assert torch.allclose(codes.sum(-1), torch.ones(2, 9))


def test_border_average_ignores_two_border_rows_and_columns():
    grid, k = 6, 3
    codes = torch.zeros(1, grid * grid, k)
    codes[..., 0] = 1.0  # border tokens all vote for code 0
    inner = [14, 15, 20, 21]  # rows/cols 2..3 of a 6x6 grid
    for i, pos in enumerate(inner):
        codes[0, pos] = torch.tensor([0.0, 1.0, 0.0]) if i < 3 else torch.tensor([0.0, 0.0, 1.0])
    avg = border_average(codes, grid=grid, border=2)
    assert torch.allclose(avg, torch.tensor([[0.0, 0.75, 0.25]]))
    # without the border rule every token counts
    full = border_average(codes, grid=grid, border=0)
    assert torch.allclose(full, torch.tensor([[32 / 36, 3 / 36, 1 / 36]]))
