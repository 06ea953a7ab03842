"""k-NN: FAISS search + vote equals an independent brute-force numpy version of DINO's formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moca_eval.errors import ConfigError
from moca_eval.protocols.knn import evaluate, knn_vote, topk_correct


def dino_knn_numpy(train, train_y, val, val_y, *, k, t, num_classes):
    """DINO eval_knn, written independently: cosine sims, top-k, sum exp(sim/T) per class."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    val = val / np.linalg.norm(val, axis=1, keepdims=True)
    sims = val @ train.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    top1 = top5 = 0
    for i in range(len(val)):
        scores = np.zeros(num_classes)
        for j in order[i]:
            scores[train_y[j]] += np.exp(sims[i, j] / t)
        ranked = np.argsort(-scores, kind="stable")
        top1 += ranked[0] == val_y[i]
        top5 += val_y[i] in ranked[:5]
    return 100.0 * top1 / len(val), 100.0 * top5 / len(val)


def _clustered(rng, centers, n, noise=1.2):
    num_classes, dim = centers.shape
    y = rng.integers(0, num_classes, n)
    return (centers[y] + noise * rng.normal(size=(n, dim))).astype(np.float32), y


def test_knn_vote_sums_exp_similarity_per_class_by_hand() -> None:
    sims = torch.tensor([[0.9, 0.5, 0.4]])
    labels = torch.tensor([[1, 0, 1]])
    scores = knn_vote(sims, labels, k=3, temperature=0.5, num_classes=3)
    want = [np.exp(0.5 / 0.5), np.exp(0.9 / 0.5) + np.exp(0.4 / 0.5), 0.0]
    assert np.allclose(scores.numpy()[0], want, rtol=1e-6)
    only_two = knn_vote(sims, labels, k=2, temperature=0.5, num_classes=3)
    assert np.allclose(only_two.numpy()[0], [np.exp(1.0), np.exp(1.8), 0.0], rtol=1e-6)


def test_topk_correct_counts_label_in_best_k() -> None:
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])
    labels = torch.tensor([2, 0])
    assert topk_correct(scores, labels, 1) == 1
    assert topk_correct(scores, labels, 2) == 2


def test_knn_matches_bruteforce_dino_formula_for_several_k_and_t() -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(12, 16))
    train, train_y = _clustered(rng, centers, 600)
    val, val_y = _clustered(rng, centers, 150)
    ks, ts = (1, 5, 20, 50), (0.04, 0.07, 0.5)
    got = {(s.k, s.temperature): (s.top1, s.top5) for s in
           evaluate(train, train_y, val, val_y, ks=ks, temperatures=ts, num_classes=12, chunk=64)}
    accs = set()
    for k in ks:
        for t in ts:
            want = dino_knn_numpy(train, train_y, val, val_y, k=k, t=t, num_classes=12)
            assert got[(k, t)] == pytest.approx(want, abs=1e-9), (k, t)
            accs.add(want[0])
    assert len(accs) > 1 and 20 < min(accs) < 100  # a non-trivial problem


def test_knn_rejects_k_larger_than_train_set() -> None:
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ConfigError, match="exceeds the 4 training images"):
        evaluate(x, np.arange(4), x, np.arange(4), ks=[5], temperatures=[0.07], num_classes=4)
