"""k-NN on cached features: moca-eval (one FAISS search, every (k, T) voted from it) against
DINO's procedure (chunked torch matmul + top-k + one-hot vote, recomputed for every (k, T)).

    python bench/bench_knn.py [--train 50000 --val 10000 --dim 384 --classes 100]
    python bench/bench_knn.py --memory 100000 400000 [--val 2000 --dim 768]

Prints a Markdown table for BENCHMARKS.md. Speed: both run in this process on the same
features. ``--memory``: each procedure runs in its own subprocess on features it generates
(float32, one copy = N x D x 4 bytes); peak RSS above the RSS before the features existed,
in copies of the train features (the input itself counts as one).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from moca_eval.protocols.knn import evaluate

MEMORY_PROCEDURES = ("features only (the floor)", "moca-eval", "moca-eval float16 index",
                     "previous moca-eval (copy + IndexFlatIP)", "DINO procedure")


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


def previous_procedure(train, train_y, val, val_y, *, k, t, num_classes):
    """moca-eval before this change: a normalised copy, then a FAISS IndexFlatIP (a third copy)."""
    import faiss

    def normalised(x):
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    index = faiss.IndexFlatIP(train.shape[1])
    index.add(normalised(train))
    sims, ids = index.search(normalised(val), k)
    weights = torch.from_numpy(sims / t).exp()
    scores = torch.zeros(len(val), num_classes, dtype=weights.dtype)
    scores.scatter_add_(1, torch.from_numpy(train_y[ids]), weights)
    return 100.0 * float((scores.argmax(1).numpy() == val_y).mean()), None


def clustered_features(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters written block by block into one float32 array (no temporary copy)."""
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(123).normal(size=(classes, dim)).astype(np.float32)
    y = rng.integers(0, classes, n)
    x = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 4096):  # small blocks: the temporaries stay negligible
        part = slice(start, start + 4096)
        x[part] = centers[y[part]] + 6.0 * rng.standard_normal((len(y[part]), dim), dtype=np.float32)
    return x, y


def memory_child(procedure: str, n: int, n_val: int, dim: int, classes: int) -> None:
    """One procedure on fresh features; prints a JSON line (peak RSS in bytes above the start)."""
    import faiss  # noqa: F401  (imported before the baseline, as every procedure needs it)

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    train, train_y = clustered_features(n, dim, classes, 0)
    val, val_y = clustered_features(n_val, dim, classes, 1)
    start = time.perf_counter()
    if procedure.startswith("features only"):
        top1 = float("nan")
    elif procedure == "DINO procedure":
        top1 = dino_procedure(train, train_y, val, val_y, k=20, t=0.07, num_classes=classes)[0]
    elif procedure.startswith("previous"):
        top1 = previous_procedure(train, train_y, val, val_y, k=20, t=0.07, num_classes=classes)[0]
    else:
        dtype = "float16" if "float16" in procedure else "float32"
        top1 = evaluate(train, train_y, val, val_y, ks=[20], temperatures=[0.07], num_classes=classes,
                        use_gpu=False, inplace=True, index_dtype=dtype)[0].top1
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"extra_bytes": peak - base, "copy_bytes": train.nbytes, "seconds": seconds,
                      "top1": top1}))


def memory_table(rows_list: list[int], n_val: int, dim: int, classes: int) -> str:
    lines = ["| train rows | procedure | peak RSS above start (MiB) | copies of the train features | "
             "bytes per train row | time (s) | top-1 (k=20, T=0.07) |", "|---|---|---|---|---|---|---|"]
    for n in rows_list:
        for procedure in MEMORY_PROCEDURES:
            out = subprocess.run([sys.executable, __file__, "--memory-child", procedure, str(n),
                                  str(n_val), str(dim), str(classes)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            lines.append(f"| {n} | {procedure} | {r['extra_bytes'] / 2**20:.0f} | "
                         f"**{r['extra_bytes'] / r['copy_bytes']:.2f}** | {r['extra_bytes'] / n:.0f} | "
                         f"{r['seconds']:.1f} | {r['top1']:.2f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train", type=int, default=50000)
    p.add_argument("--val", type=int, default=10000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--memory", type=int, nargs="+", help="train row counts for the memory table")
    p.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        name, *numbers = args.memory_child
        memory_child(name, *map(int, numbers))
        return
    if args.memory:
        print(memory_table(args.memory, args.val, args.dim, args.classes))
        return
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
