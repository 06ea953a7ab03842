"""Low-shot stopping rule and the torch solver against a converged float64 scikit-learn fit.

The reference is scikit-learn L-BFGS in float64 at gradient tolerance 1e-10 (its objective is
recomputed here by an independent numpy formula). Every low-shot recipe is checked with its
own preprocessing and lambda convention on a strongly regularised problem, where the whole
possible decrease F(0) - F* is below 1e-3 F(0): a gap relative to F(W) cannot see it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.linear_model import LogisticRegression

from moca_eval.protocols.lowshot import LOWSHOT_RECIPES, evaluate_splits
from moca_eval.protocols.lowshot_logreg import (
    DEFAULT_SOLVER,
    DEFAULT_TOL,
    TORCH_TOL,
    fit_logreg,
    objective_and_gap,
    preprocess_features,
    stop_scale,
)
from moca_eval.protocols.lowshot_torch import fit_torch

CLASSES, DIM = 60, 48


def draw(per_class: int, seed: int, classes: int = CLASSES) -> tuple[np.ndarray, np.ndarray]:
    centres = np.random.default_rng(7).standard_normal((classes, DIM))
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), per_class)
    return (1.5 + 0.7 * centres[y] + rng.standard_normal((len(y), DIM))).astype(np.float32), y


def objective(x, y, w, lambda_1) -> float:
    """F(W) written independently of the package."""
    s = np.asarray(x, np.float64) @ w
    return float(np.mean(logsumexp(s, axis=1) - s[np.arange(len(y)), y]) + lambda_1 / 2 * np.sum(w * w))


def reference(x, y, lambda_1):
    """Converged float64 scikit-learn fit of the same objective (C = 1 / (lambda_1 N))."""
    clf = LogisticRegression(C=1 / (lambda_1 * len(y)), fit_intercept=False, tol=1e-10,
                             max_iter=20000)
    return clf.fit(np.asarray(x, np.float64), y)


def top1(pred, y) -> float:
    return 100.0 * float(np.mean(pred == y))


@pytest.mark.parametrize("recipe", LOWSHOT_RECIPES.names())
def test_every_recipe_converges_when_regularisation_is_strong(recipe):
    r = LOWSHOT_RECIPES.get(recipe)
    x, y = draw(2, seed=0)
    xv, yv = draw(20, seed=1)
    x, xv = preprocess_features(x, center=r.center), preprocess_features(xv, center=r.center)
    # F(0) - F* shrinks like 1/K: 2 here is as strong as iBOT's 0.1 with 1000 classes x 2 shots
    lambda_1 = 2.0
    lambd = lambda_1 * len(y) if r.per_sample else lambda_1
    ref = reference(x, y, lambda_1)
    f_ref = objective(x, y, ref.coef_.T, lambda_1)
    decrease = math.log(CLASSES) - f_ref
    assert 0 < decrease < 1e-3 * math.log(CLASSES)  # cyanure's own relative gap stops at W = 0
    model = fit_logreg(x, y, lambd=lambd, per_sample=r.per_sample)  # the CPU default: cyanure
    assert model.solver == DEFAULT_SOLVER and model.converged
    assert model.lambda_1 == pytest.approx(lambda_1)
    f = objective(x, y, model.weights, lambda_1)
    assert f == pytest.approx(model.objective, rel=1e-12)
    assert abs(f - f_ref) <= 1e-4 * f_ref
    assert f - f_ref <= 1e-3 * decrease  # the scale-independent rule: a fraction of F(0) - F*
    assert -1e-12 <= f - f_ref <= model.gap + 1e-12  # the recorded gap is a true bound
    assert model.gap <= DEFAULT_TOL * stop_scale(f, math.log(CLASSES))
    ref_top1 = top1(ref.predict(xv), yv)
    assert 20 < ref_top1 < 95
    assert abs(top1(model.predict(xv), yv) - ref_top1) <= 0.2


@pytest.mark.parametrize("recipe", LOWSHOT_RECIPES.names())
@pytest.mark.parametrize("solver", ["auto", "torch"])
def test_every_recipe_at_its_own_lambdas(recipe, solver):
    r = LOWSHOT_RECIPES.get(recipe)
    x, y = draw(5, seed=2)
    xv, yv = draw(20, seed=3)
    x, xv = preprocess_features(x, center=r.center), preprocess_features(xv, center=r.center)
    for lambd in r.lambdas:
        model = fit_logreg(x, y, lambd=lambd, per_sample=r.per_sample, solver=solver,
                           device="cpu")
        ref = reference(x, y, model.lambda_1)
        f_ref = objective(x, y, ref.coef_.T, model.lambda_1)
        assert abs(model.objective - f_ref) <= 1e-4 * f_ref, lambd
        assert abs(top1(model.predict(xv), yv) - top1(ref.predict(xv), yv)) <= 0.2, lambd


@pytest.mark.parametrize("lambda_1,classes", [(0.1 / 300, CLASSES), (2.5e-4 / 300, CLASSES),
                                              (0.1, CLASSES), (0.01 / 40, 2)])
def test_torch_solver_matches_sklearn_float64(lambda_1, classes):
    x, y = draw(5, seed=4, classes=classes)
    xv, yv = draw(30, seed=5, classes=classes)
    x, xv = preprocess_features(x), preprocess_features(xv)
    lambd = lambda_1 * len(y)
    model = fit_logreg(x, y, lambd=lambd, solver="torch", device="cpu")
    if classes > 2:
        ref = reference(x, y, model.lambda_1)
        w_ref = ref.coef_.T
    else:  # sklearn fits v = w1 - w0, whose regulariser is lambda_1 / 2
        ref = reference(x, y, model.lambda_1 / 2)
        w_ref = np.concatenate([-ref.coef_.T, ref.coef_.T], 1) / 2
    f_ref = objective(x, y, w_ref, model.lambda_1)
    assert model.weights.dtype == np.float64 and model.weights.shape == (DIM, classes)
    assert abs(objective(x, y, model.weights, model.lambda_1) - f_ref) <= 1e-6 * f_ref
    np.testing.assert_array_equal(model.predict(xv), ref.predict(xv))
    assert model.converged and model.gap <= TORCH_TOL * stop_scale(model.objective,
                                                                   math.log(classes))


def test_torch_fit_reports_passes_and_stops_at_max_iter():
    x, y = draw(3, seed=6)
    x = preprocess_features(x)
    lambda_1 = 1e-5
    full = fit_torch(x, y, lambda_1, n_classes=CLASSES, tol=1e-8, max_iter=2000, device="cpu")
    short = fit_torch(x, y, lambda_1, n_classes=CLASSES, tol=1e-8, max_iter=4, device="cpu")
    assert full.converged and full.passes > 4
    assert not short.converged and short.passes <= 4 + 2 * 10  # one L-BFGS chunk at most
    assert short.objective > full.objective
    f, gap = objective_and_gap(x, y, full.weights, lambda_1)
    assert f == pytest.approx(full.objective, rel=1e-12) and gap == pytest.approx(full.gap, rel=1e-6)


def test_gap_is_the_gradient_bound_and_certifies_suboptimality():
    x, y = draw(3, seed=8)
    x = preprocess_features(x).astype(np.float64)
    lambda_1 = 1e-3
    ref = reference(x, y, lambda_1)
    f_star = objective(x, y, ref.coef_.T, lambda_1)
    w = 0.5 * ref.coef_.T  # a point half way from 0
    f, gap = objective_and_gap(x, y, w, lambda_1)
    p = np.exp(x @ w - logsumexp(x @ w, axis=1, keepdims=True))
    p[np.arange(len(y)), y] -= 1
    grad = x.T @ p / len(y) + lambda_1 * w
    assert gap == pytest.approx(np.sum(grad ** 2) / (2 * lambda_1), rel=1e-10)
    assert f - f_star <= gap
    _, tighter = objective_and_gap(x, y, w, lambda_1, lower_bound=f_star - 1e-9)
    assert tighter == pytest.approx(f - f_star + 1e-9, rel=1e-6)
    assert stop_scale(f, math.log(CLASSES)) == min(f, math.log(CLASSES) - f)


def test_default_solver_is_torch_exactly_when_cuda_is_available():
    assert DEFAULT_SOLVER == ("torch" if torch.cuda.is_available() else "auto")


def test_result_records_objective_gap_and_passes():
    from moca_eval.protocols.splits import DatasetKeys, Setting, make_split_files

    wn = [f"n{c:08d}" for c in range(6)]
    keys = [f"{w}/{w}_{i:04d}.JPEG" for w in wn for i in range(8)]
    data = DatasetKeys("/train", tuple(wn), tuple(keys))
    x, y = draw(8, seed=9, classes=6)
    xv, yv = draw(10, seed=10, classes=6)
    files = make_split_files(data, [Setting(shots=2)], 1, seed=0)
    (run,) = evaluate_splits(x, y, keys, xv, yv, files, lambdas=(0.1,), per_sample=True,
                             center=True, solver="torch", device="cpu")
    fit = run.as_json()["fit"]
    assert fit["solver"] == "torch" and fit["passes"] >= 1
    rows = [keys.index(k) for k in files[0].keys]
    xp = preprocess_features(x[rows])
    assert fit["objective"] == pytest.approx(objective(xp, y[rows], reference(
        xp, y[rows], 0.1 / len(rows)).coef_.T, 0.1 / len(rows)), rel=1e-6)
    assert 0 <= fit["gap"] <= TORCH_TOL * fit["objective"]


def test_cyanure_that_does_not_converge_is_finished_by_the_torch_solver(caplog):
    x, y = draw(3, seed=11)
    x = preprocess_features(x)
    model = fit_logreg(x, y, lambd=2.5e-4, solver="auto", max_iter=2)  # 2 passes: cannot converge
    assert model.solver == "auto+torch" and model.converged and model.n_iter > 2
    assert "refitting with the torch solver" in caplog.text
    ref = reference(x, y, model.lambda_1)
    f_ref = objective(x, y, ref.coef_.T, model.lambda_1)
    assert abs(model.objective - f_ref) <= 1e-6 * f_ref
