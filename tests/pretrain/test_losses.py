"""L_LOC, L_IMG and L against a hand computation on tiny tensors."""

import math

import torch

from moca_eval.pretrain.losses import image_loss, kl_to_target, local_loss, total_loss


def _kl(target, logits):
    """KL(target || softmax(logits)) for plain lists, written out."""
    norm = math.log(sum(math.exp(v) for v in logits))
    return sum(t * (math.log(t) - (v - norm)) for t, v in zip(target, logits) if t > 0)


def test_kl_to_target_matches_the_formula_and_is_zero_for_a_perfect_prediction():
    target = torch.tensor([[0.7, 0.2, 0.1]])
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    assert math.isclose(float(kl_to_target(logits, target)), _kl([0.7, 0.2, 0.1], [1.0, 0.0, -1.0]),
                        rel_tol=1e-5, abs_tol=1e-6)
    perfect = torch.log(target)
    assert abs(float(kl_to_target(perfect, target))) < 1e-6


def test_local_loss_by_hand():
    # 2 images (view 1 then view 2, n = 1), 3 tokens, K = 2, 2 decoded tokens each
    codes = torch.tensor([
        [[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]],
        [[0.6, 0.4], [0.3, 0.7], [1.0, 0.0]],
    ])
    ids = torch.tensor([[2, 0], [1, 2]])
    logits = torch.tensor([[[0.0, 1.0], [2.0, 0.0]], [[0.5, 0.5], [1.0, -1.0]]])
    pairs = [(codes[0, 2], logits[0, 0]), (codes[0, 0], logits[0, 1]),
             (codes[1, 1], logits[1, 0]), (codes[1, 2], logits[1, 1])]
    mean = sum(_kl(t.tolist(), lg.tolist()) for t, lg in pairs) / 4
    # mean over the 2N images and their decoded tokens, summed over the two views
    assert math.isclose(float(local_loss(logits, codes, ids)), 2 * mean, rel_tol=1e-5, abs_tol=1e-6)


def test_image_loss_predicts_the_other_view_by_hand():
    avg = torch.tensor([[0.7, 0.3], [0.1, 0.9], [0.4, 0.6], [0.5, 0.5]])  # views 1 (2 imgs), 2
    logits = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0], [-1.0, 1.0]])
    # image i of view 1 predicts image i of view 2 and vice versa
    other = [avg[2], avg[3], avg[0], avg[1]]
    mean = sum(_kl(t.tolist(), lg.tolist()) for t, lg in zip(other, logits)) / 4
    assert math.isclose(float(image_loss(logits, avg)), 2 * mean, rel_tol=1e-5, abs_tol=1e-6)


def test_total_loss_weights():
    assert float(total_loss(torch.tensor(2.0), torch.tensor(4.0), img_weight=0.5)) == 3.0
    assert float(total_loss(torch.tensor(2.0), torch.tensor(4.0), img_weight=0.25)) == 3.5
