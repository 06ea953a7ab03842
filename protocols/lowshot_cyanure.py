"""cyanure fits for the low-shot objective, in a spawned worker, restarted warm until the
scale-independent stopping rule of :mod:`moca_eval.protocols.lowshot_logreg` holds.

cyanure runs in a separate (spawned) worker process, never in the caller's. Its bundled
OpenBLAS/OpenMP, once it has run with more than one thread, corrupts PyTorch's later bf16
CPU kernels in the same process (seen with torch 2.14 on an AVX512-BF16 CPU: garbage and
NaN from autocast matmuls), and it prints C++ warnings to stdout; the worker keeps both out.

cyanure's ``tol`` is a duality gap relative to F(W). A first fit uses ``tol`` itself; while
the certified gap exceeds ``tol * stop_scale``, the next fit restarts from the current weights
(and, for MISO solvers, dual variables) with cyanure's tolerance set to half the wanted gap
divided by F(W), at least 10x tighter than the previous one.
"""

from __future__ import annotations

import atexit
import math
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

MAX_ROUNDS = 6

_worker: ProcessPoolExecutor | None = None


def fit_cyanure(x: np.ndarray, yi: np.ndarray, lambda_1: float, *, solver: str, dtype: str,
                tol: float, max_iter: int, n_threads: int, seed: int
                ) -> tuple[np.ndarray, int, bool, float]:
    """``(weights [D, K], passes, converged, dual lower bound on F*)``, fitted in the worker."""
    global _worker
    try:
        return _cyanure_worker().submit(
            _fit_here, np.ascontiguousarray(x, dtype=np.dtype(dtype)), yi, lambda_1,
            solver=solver, tol=tol, max_iter=max_iter, n_threads=n_threads, seed=seed).result()
    except BrokenProcessPool as err:
        _worker = None
        raise RuntimeError(f"the cyanure worker process died ({err}); "
                           "rerun with --solver torch or sklearn to avoid cyanure") from None


def _silence_stdout() -> None:
    """Worker initialiser: cyanure's C++ warnings go to /dev/null, not the caller's stdout."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)


def _cyanure_worker() -> ProcessPoolExecutor:
    """The one spawned process that runs every cyanure fit of this process (see the docstring)."""
    global _worker
    if _worker is None:
        _worker = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_silence_stdout)
        atexit.register(_worker.shutdown, cancel_futures=True)
    return _worker


def _fit_here(x: np.ndarray, yi: np.ndarray, lambda_1: float, *, solver: str, tol: float,
              max_iter: int, n_threads: int, seed: int) -> tuple[np.ndarray, int, bool, float]:
    from cyanure.estimators import Classifier

    from moca_eval.protocols.lowshot_logreg import objective_and_gap, stop_scale

    n_classes = int(yi.max()) + 1
    binary = n_classes == 2
    # two classes: a binary problem on v = w1 - w0 whose regulariser is lambda_1 / 2
    clf = Classifier(
        loss="logistic" if binary else "multiclass-logistic", penalty="l2", fit_intercept=False,
        lambda_1=lambda_1 / 2 if binary else lambda_1, solver=solver, tol=tol,
        max_iter=max_iter, verbose=False, n_threads=n_threads, random_state=seed,
        multi_class="auto", warm_start=True)
    target = np.where(yi == 1, 1, -1) if binary else yi
    passes, cy_tol, f0 = 0, tol, math.log(n_classes)
    for _ in range(MAX_ROUNDS):
        clf.tol, clf.max_iter = cy_tol, max_iter - passes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # max_iter warnings: reported through `converged`
            clf.fit(x, target)
        passes += int(np.max(clf.n_iter_))
        w = np.asarray(clf.coef_, dtype=np.float64).reshape(x.shape[1], -1)
        if binary:
            w = np.stack([-w[:, 0] / 2, w[:, 0] / 2], axis=1)
        dual = _last_dual(clf) if x.dtype == np.float64 else -math.inf  # float32 duals are wrong
        f, gap = objective_and_gap(x, yi, w, lambda_1, lower_bound=dual)
        wanted = tol * stop_scale(f, f0)
        if gap <= wanted or passes >= max_iter:
            break
        cy_tol = min(cy_tol / 10, 0.5 * wanted / f)
    return w, passes, gap <= wanted, f - gap


def _last_dual(clf) -> float:
    """cyanure's last dual objective (rows of ``optimization_info_``: epoch, primal, dual, ...)."""
    info = np.asarray(clf.optimization_info_)[0]
    done = info[0] > 0
    return float(info[2][done][-1]) if done.any() else -math.inf
