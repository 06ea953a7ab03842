"""L2-regularised multinomial logistic regression for low-shot evaluation (cyanure 1.x).

The objective, for N training rows ``x_i`` with labels ``y_i`` among K classes, is::

    F(W) = 1/N sum_i [logsumexp(W^T x_i) - w_{y_i}^T x_i] + lambda_1 / 2 ||W||_F^2

with no intercept. MSN/MOCA set ``lambda_1 = lambd / N`` (``per_sample=True``), which is
scikit-learn's ``LogisticRegression(C=1/lambd, fit_intercept=False)``; iBOT passes ``lambd``
to cyanure unchanged (``per_sample=False``).

Two cyanure 1.2 pitfalls are handled here rather than left to callers:
- ``Classifier.predict`` maps labels back wrongly when they do not start at 0, and the
  fitted columns follow ``np.unique(y)``: labels are re-indexed and prediction is done here.
- with exactly two classes cyanure silently falls back to the square loss for
  ``multiclass-logistic``; the two-class multinomial problem is solved exactly as a binary
  logistic problem on ``v = w_1 - w_0`` with half the regularisation (``W = [-v/2, v/2]``).

cyanure runs in a separate (spawned) worker process, never in the caller's. Its bundled
OpenBLAS/OpenMP, once it has run with more than one thread, corrupts PyTorch's later bf16
CPU kernels in the same process (seen with torch 2.14 on an AVX512-BF16 CPU: garbage and
NaN from autocast matmuls), and it prints C++ warnings to stdout; the worker keeps both out.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import logsumexp

from moca_eval.errors import ConfigError

log = logging.getLogger(__name__)

Solver = Literal[
    "auto", "catalyst-miso", "qning-miso", "miso", "svrg", "catalyst-svrg", "qning-svrg",
    "acc-svrg", "ista", "fista", "catalyst-ista", "qning-ista", "sklearn",
]
CYANURE_SOLVERS: tuple[str, ...] = (
    "auto", "catalyst-miso", "qning-miso", "miso", "svrg", "catalyst-svrg", "qning-svrg",
    "acc-svrg", "ista", "fista", "catalyst-ista", "qning-ista",
)
SOLVERS: tuple[str, ...] = (*CYANURE_SOLVERS, "sklearn")
DType = Literal["float32", "float64"]

# Chosen with bench/bench_lowshot.py (table and reasoning in BENCHMARKS.md): the fastest
# cyanure setting that reached the converged float64 scikit-learn objective within 1e-3
# (relative) and its top-1 within 0.2 points at both lambda 0.1 and 2.5e-4 (1000 classes x 5
# shots, 768-d). 'auto' resolves to catalyst-miso at lambda 0.1 and to qning-miso at 2.5e-4;
# tol 1e-3 is MSN's and was 40% faster than 1e-4 at 2.5e-4 for the same accuracy. float32 is
# NOT safe: its duality gap is wrong, so it stops early (-23 points at lambda 0.1).
DEFAULT_SOLVER: str = "auto"
DEFAULT_DTYPE: DType = "float64"
DEFAULT_TOL: float = 1e-3
DEFAULT_MAX_ITER: int = 500
# The float64 L-BFGS fallback: a gradient tolerance, so much tighter (the bench reference).
SKLEARN_TOL: float = 1e-8
SKLEARN_MAX_ITER: int = 5000


@dataclass(frozen=True)
class LogRegModel:
    """A fitted linear classifier: ``scores = x @ weights``; column j predicts ``classes[j]``."""

    weights: np.ndarray
    classes: np.ndarray
    lambda_1: float
    solver: str
    n_iter: int
    converged: bool

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Class scores ``[N, K]``."""
        return np.asarray(x, dtype=self.weights.dtype) @ self.weights

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted labels (values of ``classes``)."""
        return self.classes[np.argmax(self.decision_function(x), axis=1)]


def preprocess_features(x: np.ndarray, *, center: bool = True) -> np.ndarray:
    """Row-centre (optionally) then L2-normalise each row; returns a new C-ordered array.

    Equivalent to ``cyanure.data_processing.preprocess(x, centering=center, normalize=True,
    columns=False)`` but safe: cyanure's version works in place through ``x.T`` and so does
    nothing at all on a Fortran-ordered (or non-contiguous) array, and it fills all-zero rows
    with arbitrary unit vectors. Here the order of ``x`` is irrelevant and a zero row stays 0.
    """
    from sklearn.preprocessing import normalize

    x = np.array(x, dtype=np.result_type(x.dtype, np.float32), order="C", copy=True)
    if x.ndim != 2:
        raise ValueError(f"features must be a 2-D array, got shape {x.shape}")
    if center:
        x -= x.mean(axis=1, keepdims=True, dtype=np.float64).astype(x.dtype)
    return normalize(x, norm="l2", axis=1, copy=False)


def lambda_1_for(lambd: float, n: int, *, per_sample: bool = True) -> float:
    """cyanure's ``lambda_1`` for a user ``lambd`` and ``n`` training rows."""
    if lambd <= 0:
        raise ConfigError(f"lambda must be positive, got {lambd}")
    return lambd / n if per_sample else lambd


def logreg_objective(x: np.ndarray, y: np.ndarray, weights: np.ndarray, lambda_1: float) -> float:
    """The objective F(W) above in float64; ``y`` holds column indices into ``weights``."""
    scores = np.asarray(x, np.float64) @ np.asarray(weights, np.float64)
    data = np.mean(logsumexp(scores, axis=1) - scores[np.arange(len(y)), y])
    return float(data + 0.5 * lambda_1 * np.sum(np.square(weights, dtype=np.float64)))


def fit_logreg(
    x: np.ndarray,
    y: np.ndarray,
    *,
    lambd: float,
    solver: str = DEFAULT_SOLVER,
    per_sample: bool = True,
    dtype: DType = DEFAULT_DTYPE,
    tol: float | None = None,
    max_iter: int | None = None,
    n_threads: int = -1,
    seed: int = 0,
) -> LogRegModel:
    """Fit the multinomial logistic regression on preprocessed features ``x`` [N, D].

    Args:
        x: training features (already passed through :func:`preprocess_features`).
        y: integer labels [N]; any values, the model maps its columns back to them.
        lambd: regularisation; ``lambda_1 = lambd / N`` unless ``per_sample`` is False.
        solver: a cyanure solver name, or ``"sklearn"`` (float64 L-BFGS fallback).
        dtype: float type the cyanure solver works in (sklearn always uses float64).
        tol: cyanure's relative duality-gap tolerance (default ``DEFAULT_TOL``); for sklearn
            L-BFGS's gradient tolerance (default ``SKLEARN_TOL``).
        max_iter: passes over the data (cyanure, default ``DEFAULT_MAX_ITER``) or L-BFGS
            iterations (sklearn, default ``SKLEARN_MAX_ITER``).
        n_threads: cyanure threads, -1 for all cores.
        seed: cyanure's random seed (stochastic solvers).
    """
    if solver not in SOLVERS:
        raise ConfigError(f"unknown solver {solver!r} (known: {', '.join(SOLVERS)})")
    classes, yi = np.unique(np.asarray(y), return_inverse=True)
    if len(classes) < 2:
        raise ConfigError(f"logistic regression needs at least 2 classes, got {len(classes)}")
    lam1 = lambda_1_for(lambd, len(yi), per_sample=per_sample)
    binary = len(classes) == 2
    # two classes: a binary problem on v = w1 - w0 whose regulariser is lambda_1 / 2
    lam_fit = lam1 / 2 if binary else lam1
    target = np.where(yi == 1, 1, -1) if binary else yi
    if solver == "sklearn":
        tol, max_iter = tol or SKLEARN_TOL, max_iter or SKLEARN_MAX_ITER
        w, n_iter, converged = _fit_sklearn(x, target, lam_fit, tol=tol, max_iter=max_iter)
    else:
        tol, max_iter = tol or DEFAULT_TOL, max_iter or DEFAULT_MAX_ITER
        w, n_iter, converged = _fit_cyanure(
            x=np.ascontiguousarray(x, dtype=np.dtype(dtype)), target=target, lambda_1=lam_fit,
            binary=binary, solver=solver, tol=tol, max_iter=max_iter, n_threads=n_threads, seed=seed,
        )
    if binary:
        v = w.reshape(-1)
        w = np.stack([-v / 2, v / 2], axis=1)
    if not converged:
        log.warning("logistic regression (%s) stopped at max_iter=%d before tol=%g",
                    solver, max_iter, tol)
    return LogRegModel(weights=np.ascontiguousarray(w), classes=classes, lambda_1=lam1,
                       solver=solver, n_iter=n_iter, converged=converged)


_worker: ProcessPoolExecutor | None = None


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


def _fit_cyanure(**kwargs) -> tuple[np.ndarray, int, bool]:
    """:func:`_fit_cyanure_here` in the worker process."""
    global _worker
    try:
        return _cyanure_worker().submit(_fit_cyanure_here, **kwargs).result()
    except BrokenProcessPool as err:
        _worker = None
        raise RuntimeError(f"the cyanure worker process died ({err}); "
                           "rerun with --solver sklearn to avoid cyanure") from None


def _fit_cyanure_here(
    x: np.ndarray, target: np.ndarray, lambda_1: float, *, binary: bool, solver: str,
    tol: float, max_iter: int, n_threads: int, seed: int,
) -> tuple[np.ndarray, int, bool]:
    from cyanure.estimators import Classifier

    clf = Classifier(
        loss="logistic" if binary else "multiclass-logistic", penalty="l2", fit_intercept=False,
        lambda_1=lambda_1, solver=solver, tol=tol, max_iter=max_iter, verbose=False,
        n_threads=n_threads, random_state=seed, multi_class="auto",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # max_iter warnings: reported through `converged`
        clf.fit(x, target)
    n_iter = int(np.max(clf.n_iter_))
    w = np.asarray(clf.coef_).reshape(x.shape[1], -1)
    return w, n_iter, n_iter < max_iter


def _fit_sklearn(
    x: np.ndarray, target: np.ndarray, lambda_1: float, *, tol: float, max_iter: int,
) -> tuple[np.ndarray, int, bool]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    # float64 always: L-BFGS in float32 stops after a few iterations on these problems
    x64 = np.asarray(x, dtype=np.float64)
    clf = LogisticRegression(C=1.0 / (lambda_1 * len(target)), l1_ratio=0.0,
                             fit_intercept=False, solver="lbfgs", tol=tol, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x64, target)
    n_iter = int(np.max(clf.n_iter_))
    return clf.coef_.T.copy(), n_iter, n_iter < max_iter


def top1_accuracy(model: LogRegModel, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float(100.0 * np.mean(model.predict(x) == np.asarray(y)))
