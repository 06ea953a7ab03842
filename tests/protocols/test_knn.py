"""k-NN: FAISS search + vote equals an independent brute-force numpy version of DINO's formula;
sharded search equals unsharded exactly; in-place normalisation; float16 index."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moca_eval.errors import ConfigError
from moca_eval.protocols.knn import (
    evaluate,
    gpu_shard_rows,
    knn_vote,
    l2_normalize,
    merge_topk,
    search,
    to_index_dtype,
    topk_correct,
)


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


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("shard_rows", [1, 7, 1000, 1024, 1500, 4999])
def test_sharded_search_equals_unsharded_exactly(shard_rows):
    rng = np.random.default_rng(1)
    train, query = _unit(rng, 5000, 32), _unit(rng, 200, 32)
    whole = search(train, query, 30, use_gpu=False, shard_rows=len(train))
    sharded = search(train, query, 30, use_gpu=False, shard_rows=shard_rows)
    np.testing.assert_array_equal(sharded[1], whole[1])
    np.testing.assert_array_equal(sharded[0], whole[0])
    brute = np.argsort(-(query.astype(np.float64) @ train.T.astype(np.float64)), axis=1)[:, :30]
    np.testing.assert_array_equal(whole[1], brute)  # no near-ties in this problem


def test_sharded_evaluation_gives_identical_scores():
    rng = np.random.default_rng(2)
    centers = rng.normal(size=(12, 16))
    train, train_y = _clustered(rng, centers, 3000)
    val, val_y = _clustered(rng, centers, 300)
    kw = dict(ks=(1, 20, 50), temperatures=(0.07,), num_classes=12, use_gpu=False)
    assert evaluate(train, train_y, val, val_y, shard_rows=777, **kw) == evaluate(
        train, train_y, val, val_y, shard_rows=len(train), **kw)


def test_merge_topk_keeps_order_and_puts_the_first_list_first_on_ties():
    sims, ids = np.array([[0.9, 0.5]], np.float32), np.array([[3, 8]])
    got = merge_topk(sims, ids, np.array([[0.7, 0.5]], np.float32), np.array([[12, 10]]), 3)
    np.testing.assert_array_equal(got[0], np.array([[0.9, 0.7, 0.5]], np.float32))
    np.testing.assert_array_equal(got[1], [[3, 12, 8]])


def test_inplace_normalisation_uses_the_callers_array_and_never_copies():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 8)).astype(np.float32) * 5
    want = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = l2_normalize(x, inplace=True)
    assert np.shares_memory(out, x)
    np.testing.assert_allclose(x, want, rtol=1e-6)
    y = rng.standard_normal((30, 8))  # float64: converted, the caller's array untouched
    before = y.copy()
    out = l2_normalize(y, inplace=True)
    assert out.dtype == np.float32 and not np.shares_memory(out, y)
    np.testing.assert_array_equal(y, before)
    z = rng.standard_normal((30, 8)).astype(np.float32)
    before = z.copy()
    l2_normalize(z)  # default: a copy
    np.testing.assert_array_equal(z, before)


def test_evaluate_inplace_gives_the_same_scores_as_a_copy():
    rng = np.random.default_rng(4)
    centers = rng.normal(size=(6, 16))
    train, train_y = _clustered(rng, centers, 400)
    val, val_y = _clustered(rng, centers, 100)
    kw = dict(ks=(5,), temperatures=(0.07,), num_classes=6, use_gpu=False)
    copied = evaluate(train, train_y, val, val_y, **kw)
    assert evaluate(train, train_y, val, val_y, inplace=True, **kw) == copied
    np.testing.assert_allclose(np.linalg.norm(train, axis=1), 1.0, rtol=1e-6)


def test_float16_index_is_close_to_float32():
    rng = np.random.default_rng(5)
    centers = rng.normal(size=(12, 32))
    train, train_y = _clustered(rng, centers, 2000)
    val, val_y = _clustered(rng, centers, 500)
    kw = dict(ks=(20,), temperatures=(0.07,), num_classes=12, use_gpu=False, shard_rows=512)
    (f32,) = evaluate(train, train_y, val, val_y, **kw)
    (f16,) = evaluate(train, train_y, val, val_y, index_dtype="float16", **kw)
    assert abs(f16.top1 - f32.top1) <= 1.0 and 20 < f32.top1 < 100
    t16 = to_index_dtype(l2_normalize(train), "float16")
    assert t16.dtype == np.float16
    np.testing.assert_allclose(t16.astype(np.float32), l2_normalize(train), atol=1e-3)
    with pytest.raises(ConfigError, match="float32 or float16"):
        to_index_dtype(train, "int8")


def test_gpu_shard_rows_takes_half_the_free_memory_less_the_queries():
    free, dim, n_query = 8 * 2**30, 768, 50_000
    rows = gpu_shard_rows(free, dim, 2, n_query)
    assert rows == int((0.5 * free - 4 * n_query * dim) // (dim * 2))
    assert gpu_shard_rows(free, dim, 4, n_query) == int((0.5 * free - 4 * n_query * dim) // (dim * 4))
    with pytest.raises(ConfigError, match="not enough"):
        gpu_shard_rows(2**20, dim, 4, 10)
