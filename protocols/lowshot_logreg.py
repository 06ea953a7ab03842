"""L2-regularised multinomial logistic regression for low-shot evaluation (cyanure 1.x).

The objective, for N training rows ``x_i`` with labels ``y_i`` among K classes, is::

    F(W) = 1/N sum_i [logsumexp(W^T x_i) - w_{y_i}^T x_i] + lambda_1 / 2 ||W||_F^2

with no intercept. MSN/MOCA set ``lambda_1 = lambd / N`` (``per_sample=True``), which is
scikit-learn's ``LogisticRegression(C=1/lambd, fit_intercept=False)``; iBOT passes ``lambd``
to cyanure unchanged (``per_sample=False``).

Stopping is independent of the scale of F. cyanure's own ``tol`` is a duality gap relative to
F(W); with strong regularisation (iBOT: lambda_1 = 0.1, 1000 classes x 2 shots) the whole
possible decrease F(0) - F* = 1.5e-3 is far below 1e-3 F(0), so it stopped after 5 passes,
2 points short. Here every solver stops on a certified gap ``F(W) - lower bound on F*`` at
most ``tol * min(F(W), F(0) - F(W))`` (:func:`stop_scale`), where the lower bound is the best
of ``F(W) - ||grad F(W)||^2 / (2 lambda_1)`` (strong convexity) and cyanure's dual value;
cyanure is restarted warm with a tighter tolerance until that holds. The fitted model
records the final objective, gap and passes.

Two cyanure 1.2 pitfalls are handled here rather than left to callers:
- ``Classifier.predict`` maps labels back wrongly when they do not start at 0, and the
  fitted columns follow ``np.unique(y)``: labels are re-indexed and prediction is done here.
- with exactly two classes cyanure silently falls back to the square loss for
  ``multiclass-logistic``; the two-class multinomial problem is solved exactly as a binary
  logistic problem on ``v = w_1 - w_0`` with half the regularisation (``W = [-v/2, v/2]``).

cyanure runs in a spawned worker process (:mod:`moca_eval.protocols.lowshot_cyanure`).
``solver='torch'`` is full-batch L-BFGS in float64 on a GPU when there is one
(:mod:`moca_eval.protocols.lowshot_torch`), the default when torch sees CUDA;
``solver='sklearn'`` is scikit-learn's float64 L-BFGS (the reference of tests and benches).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp, softmax

from moca_eval.errors import ConfigError
from moca_eval.protocols.lowshot_settings import (  # noqa: F401 (re-exported)
    CYANURE_SOLVERS,
    DEFAULT_DTYPE,
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    SKLEARN_MAX_ITER,
    SKLEARN_TOL,
    SOLVERS,
    TORCH_MAX_ITER,
    TORCH_TOL,
    DType,
)

log = logging.getLogger(__name__)

def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return torch.cuda.is_available()


# With a GPU the torch solver; else cyanure 'auto' (lowshot_settings.py says why).
DEFAULT_SOLVER: str = "torch" if _cuda_available() else "auto"


def solver_defaults(solver: str) -> tuple[str, float, int]:
    """``(library, default tol, default max_iter)`` of a solver name."""
    if solver == "sklearn":
        return "sklearn", SKLEARN_TOL, SKLEARN_MAX_ITER
    if solver == "torch":
        return "torch", TORCH_TOL, TORCH_MAX_ITER
    return "cyanure", DEFAULT_TOL, DEFAULT_MAX_ITER


@dataclass(frozen=True)
class LogRegModel:
    """A fitted linear classifier: ``scores = x @ weights``; column j predicts ``classes[j]``.

    ``objective`` is F(W) in float64, ``gap`` the certified bound on ``F(W) - F*`` and
    ``n_iter`` the passes over the data (sklearn: L-BFGS iterations).
    """

    weights: np.ndarray
    classes: np.ndarray
    lambda_1: float
    solver: str
    n_iter: int
    converged: bool
    objective: float = math.nan
    gap: float = math.nan

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Class scores ``[N, K]``."""
        return np.asarray(x, dtype=self.weights.dtype) @ self.weights

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted labels (values of ``classes``)."""
        return self.classes[np.argmax(self.decision_function(x), axis=1)]

    def fit_record(self) -> dict:
        """What the result JSON stores about the optimisation."""
        return {"objective": self.objective, "gap": self.gap, "passes": self.n_iter,
                "solver": self.solver}


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
    return objective_and_gap(x, y, weights, lambda_1)[0]


def objective_and_gap(x: np.ndarray, y: np.ndarray, weights: np.ndarray, lambda_1: float, *,
                      lower_bound: float = -math.inf) -> tuple[float, float]:
    """``(F(W), gap)`` in float64: ``gap = min(|grad F(W)|^2 / (2 lambda_1), F(W) - lower_bound)``,
    a certified upper bound on ``F(W) - F*`` (F is lambda_1-strongly convex)."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(weights, np.float64)
    scores = x64 @ w64
    rows = np.arange(len(y))
    f = float(np.mean(logsumexp(scores, axis=1) - scores[rows, y])
              + 0.5 * lambda_1 * np.sum(np.square(w64)))
    residual = softmax(scores, axis=1)
    residual[rows, y] -= 1.0
    grad = x64.T @ residual / len(y) + lambda_1 * w64
    # max(0, .): a dual value can exceed F(W) by rounding once converged
    return f, max(0.0, min(float(np.sum(np.square(grad))) / (2.0 * lambda_1), f - lower_bound))


def stop_scale(objective: float, f0: float) -> float:
    """The scale a gap is compared with: ``min(F(W), F(0) - F(W))``.

    ``F(W)`` alone (cyanure's relative gap) is meaningless when regularisation is strong and
    all of F lies in the constant ``F(0) = log K``; ``F(0) - F(W)`` alone is loose when it is
    weak (F* near 0). The smaller of the two is meaningful in both regimes.
    """
    return max(min(objective, f0 - objective), 0.0)


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
    device: str | None = None,
) -> LogRegModel:
    """Fit the multinomial logistic regression on preprocessed features ``x`` [N, D].

    Args:
        x: training features (already passed through :func:`preprocess_features`).
        y: integer labels [N]; any values, the model maps its columns back to them.
        lambd: regularisation; ``lambda_1 = lambd / N`` unless ``per_sample`` is False.
        solver: a cyanure solver name, ``"torch"`` (float64 L-BFGS on the GPU when there is
            one) or ``"sklearn"`` (float64 L-BFGS, the reference).
        dtype: float type the cyanure solver works in (torch and sklearn use float64).
        tol: stop once the certified gap is at most ``tol * min(F(W), F(0) - F(W))``
            (default ``DEFAULT_TOL``, torch ``TORCH_TOL``); for sklearn L-BFGS's gradient
            tolerance (``SKLEARN_TOL``).
        max_iter: passes over the data (cyanure, torch) or L-BFGS iterations (sklearn).
        n_threads: cyanure threads, -1 for all cores.
        seed: cyanure's random seed (stochastic solvers).
        device: torch device of the torch solver (default: CUDA when available).
    """
    if solver not in SOLVERS:
        raise ConfigError(f"unknown solver {solver!r} (known: {', '.join(SOLVERS)})")
    classes, yi = np.unique(np.asarray(y), return_inverse=True)
    if len(classes) < 2:
        raise ConfigError(f"logistic regression needs at least 2 classes, got {len(classes)}")
    lam1 = lambda_1_for(lambd, len(yi), per_sample=per_sample)
    _, default_tol, default_max_iter = solver_defaults(solver)
    tol, max_iter = tol or default_tol, max_iter or default_max_iter
    lower_bound = -math.inf
    if solver == "torch":
        from moca_eval.protocols.lowshot_torch import fit_torch

        fit = fit_torch(x, yi, lam1, n_classes=len(classes), tol=tol, max_iter=max_iter,
                        device=device)
        w, n_iter, converged = fit.weights, fit.passes, fit.converged
    elif solver == "sklearn":
        w, n_iter, converged = _fit_sklearn(x, yi, lam1, tol=tol, max_iter=max_iter)
    else:
        from moca_eval.protocols.lowshot_cyanure import fit_cyanure

        w, n_iter, converged, lower_bound = fit_cyanure(
            x, yi, lam1, solver=solver, dtype=dtype, tol=tol, max_iter=max_iter,
            n_threads=n_threads, seed=seed)
        if not converged:  # e.g. 'auto' float64 stalled at F = 3.06 on 250 classes x 1 shot
            from moca_eval.protocols.lowshot_torch import fit_torch

            log.warning("cyanure (%s) did not reach the gap in %d passes; refitting with the torch "
                        "solver", solver, n_iter)
            fit = fit_torch(x, yi, lam1, n_classes=len(classes), tol=tol,
                            max_iter=TORCH_MAX_ITER, device=device)
            w, n_iter, converged = fit.weights, n_iter + fit.passes, fit.converged
            solver, lower_bound = f"{solver}+torch", -math.inf
    objective, gap = objective_and_gap(x, yi, w, lam1, lower_bound=lower_bound)
    if not converged:
        log.warning("logistic regression (%s) stopped at max_iter=%d before tol=%g (gap %.3g)",
                    solver, max_iter, tol, gap)
    return LogRegModel(weights=np.ascontiguousarray(w), classes=classes, lambda_1=lam1,
                       solver=solver, n_iter=n_iter, converged=converged, objective=objective,
                       gap=gap)


def _fit_sklearn(
    x: np.ndarray, yi: np.ndarray, lambda_1: float, *, tol: float, max_iter: int,
) -> tuple[np.ndarray, int, bool]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    binary = yi.max() == 1
    # two classes: sklearn fits one vector v = w1 - w0, whose regulariser is lambda_1 / 2
    lam_fit = lambda_1 / 2 if binary else lambda_1
    # float64 always: L-BFGS in float32 stops after a few iterations on these problems
    x64 = np.asarray(x, dtype=np.float64)
    clf = LogisticRegression(C=1.0 / (lam_fit * len(yi)), l1_ratio=0.0,
                             fit_intercept=False, solver="lbfgs", tol=tol, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(x64, np.where(yi == 1, 1, -1) if binary else yi)
    n_iter = int(np.max(clf.n_iter_))
    w = clf.coef_.T.copy()
    if binary:
        v = w.reshape(-1)
        w = np.stack([-v / 2, v / 2], axis=1)
    return w, n_iter, n_iter < max_iter


def top1_accuracy(model: LogRegModel, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float(100.0 * np.mean(model.predict(x) == np.asarray(y)))
