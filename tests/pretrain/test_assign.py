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


def test_mu_is_updated_once_per_view_in_order_as_mocas_assign_words():
    """MOCA's ``assign_words`` runs once per view, each run doing ``mu <- 0.99 mu + 0.01 gap``:
    one step is ``mu <- 0.99^2 mu + 0.0099 gap_1 + 0.01 gap_2``, not the EMA of the mean gap."""
    assigner = TeacherAssigner(OnlineCodebook(8, 4, num_new=4), inv_delta=10.0, decay=0.99)
    assert math.isclose(float(assigner.tau), 0.05, rel_tol=1e-6)  # mu starts at 0.5, as in MOCA
    assigner.update_mu(torch.tensor([0.8, 0.2]))
    mu = 0.9801 * 0.5 + 0.0099 * 0.8 + 0.01 * 0.2  # = 0.49997
    assert math.isclose(float(assigner.mu_msd), mu, rel_tol=1e-6)
    assert abs(mu - 0.5) > 2e-5  # the mean-gap update (0.99 * 0.5 + 0.01 * 0.5) would give 0.5
    assert math.isclose(float(assigner.tau), mu / 10.0, rel_tol=1e-6)
    other = TeacherAssigner(OnlineCodebook(8, 4, num_new=4))
    other.update_mu(torch.tensor([0.2, 0.8]))  # the order matters: view 1 is damped once more
    assert math.isclose(float(other.mu_msd), 0.9801 * 0.5 + 0.0099 * 0.2 + 0.01 * 0.8, rel_tol=1e-6)


def test_update_pushes_words_updates_mu_and_counts_steps():
    assigner = TeacherAssigner(OnlineCodebook(8, 2, num_new=4))
    new = torch.tensor([[1.0, 0.0]] * 4)
    assigner.update(new, torch.tensor([0.5, 0.5]))
    assigner.update(new, torch.tensor([0.5, 0.5]))
    assert int(assigner.codebook.ptr) == 0 and float(assigner.num_updates) == 2.0  # 2 x 4 words of 8
    assert torch.equal(assigner.codebook.words, new.repeat(2, 1))


def test_forward_uses_the_current_tau_and_reports_each_views_gap():
    torch.manual_seed(0)
    assigner = TeacherAssigner(OnlineCodebook(8, 4, num_new=4))
    tokens = torch.randn(4, 9, 4)  # views 1 and 2 of two images
    words = assigner.codebook.words
    codes, gaps = assigner(tokens, words)
    sims = torch.nn.functional.normalize(tokens, dim=-1) @ words.t()
    assert torch.allclose(codes, torch.softmax(sims / 0.05, dim=-1), atol=1e-6)
    gap = sims.max(-1).values - sims.mean(-1)
    assert torch.allclose(gaps, torch.stack([gap[:2].mean(), gap[2:].mean()]))
    assert torch.allclose(codes.sum(-1), torch.ones(4, 9))


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
