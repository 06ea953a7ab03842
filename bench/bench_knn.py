"""k-NN on cached features: moca-eval (one FAISS search, every (k, T) voted from it) against
DINO's procedure (chunked torch matmul + top-k + one-hot vote, recomputed for every (k, T)).

    python bench/bench_knn.py [--train 50000 --val 10000 --dim 384 --classes 100]

Prints a Markdown table for BENCHMARKS.md. Both run in this process on the same features.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from moca_eval.protocols.knn import evaluate


def dino_procedure(train, train_y, val, val_y, *, k, t, num_classes, chunk=100):
    """DINO eval_knn's algorithm (re-implemented): per chunk, matmul, topk(k), one-hot vote."""
    train = torch.nn.functional.normalize(torch.from_numpy(train), dim=1)
    val = torch.nn.functional.normalize(torch.from_numpy(val), dim=1)
    train_y, val_y = torch.from_numpy(train_y), torch.from_numpy(val_y)
    top1 = top5 = 0
    for start in range(0, len(val), chunk):
        q, y = val[start:start + chunk], val_y[start:start + chunk]
        sims, idx = (q @ train.T).topk(k, dim=1)
        neighbors = train_y[idx]
        one_hot = torch.zeros(len(q) * k, num_classes).scatter_(1, neighbors.reshape(-1, 1), 1)
        weights = (sims / t).exp()
        probs = (one_hot.view(len(q), k, num_classes) * weights.view(len(q), k, 1)).sum(1)
        pred = probs.sort(dim=1, descending=True, stable=True).indices
        top1 += (pred[:, :1] == y[:, None]).any(1).sum().item()
        top5 += (pred[:, :5] == y[:, None]).any(1).sum().item()
    return 100.0 * top1 / len(val), 100.0 * top5 / len(val)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train", type=int, default=50000)
    p.add_argument("--val", type=int, default=10000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=100)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(args.classes, args.dim))
    train_y = rng.integers(0, args.classes, args.train)
    val_y = rng.integers(0, args.classes, args.val)
    train = (centers[train_y] + 6.0 * rng.normal(size=(args.train, args.dim))).astype(np.float32)
    val = (centers[val_y] + 6.0 * rng.normal(size=(args.val, args.dim))).astype(np.float32)
    ks, ts = (10, 20, 100, 200), (0.04, 0.07)

    start = time.perf_counter()
    ours = {(s.k, s.temperature): s.top1 for s in evaluate(
        train, train_y, val, val_y, ks=ks, temperatures=ts, num_classes=args.classes, use_gpu=False)}
    t_ours = time.perf_counter() - start

    start = time.perf_counter()
    ref = {(k, t): dino_procedure(train, train_y, val, val_y, k=k, t=t, num_classes=args.classes)[0]
           for k in ks for t in ts}
    t_ref = time.perf_counter() - start

    same = all(abs(ours[key] - ref[key]) < 1e-9 for key in ref)
    print(f"| k-NN, {len(ks)} k x {len(ts)} T, {args.train} train / {args.val} val x {args.dim}-d, "
          f"{args.classes} classes, {torch.get_num_threads()} threads | DINO procedure {t_ref:.1f} s | "
          f"moca-eval {t_ours:.1f} s | **{t_ref / t_ours:.1f}x** | top-1 identical: {same} "
          f"(k=20,T=0.07: {ours[(20, 0.07)]:.2f}) |")


if __name__ == "__main__":
    main()
