"""Low-shot classifier: cyanure vs scikit-learn, preprocessing, lambda selection, evaluation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from moca_eval.errors import ConfigError
from moca_eval.features import check_feature_name
from moca_eval.protocols.lowshot import (
    LOWSHOT_RECIPES,
    RunScore,
    evaluate_splits,
    select_lambda,
    summarise,
)
from moca_eval.protocols.lowshot_logreg import (
    fit_logreg,
    logreg_objective,
    preprocess_features,
    top1_accuracy,
)
from moca_eval.protocols.splits import DatasetKeys, Setting, make_split_files


def blobs(n_per_class: int, classes: int = 10, dim: int = 32, seed: int = 0, sep: float = 0.6):
    """Gaussian classes (fixed centres per ``classes``/``dim``) with a shared offset."""
    centres = np.random.default_rng(123).standard_normal((classes, dim))
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    x = 2.0 + sep * centres[y] + rng.standard_normal((len(y), dim))
    return x.astype(np.float32), y


def numpy_preprocess(x, center=True):
    x = np.asarray(x, np.float64)
    if center:
        x = x - x.mean(1, keepdims=True)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n == 0, 1, n)


def sklearn_fit(x, y, C):
    clf = LogisticRegression(C=C, fit_intercept=False, tol=1e-10, max_iter=10000)
    return clf.fit(np.asarray(x, np.float64), y)


def gradient(x, yi, w, lambda_1):
    """Gradient of the multinomial objective (independent of any solver)."""
    x = np.asarray(x, np.float64)
    p = softmax(x @ w, axis=1)
    p[np.arange(len(yi)), yi] -= 1
    return x.T @ p / len(yi) + lambda_1 * w


def test_preprocess_centres_normalises_any_memory_order():
    x = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32) + 3
    x[3] = 4.0  # a constant row becomes zero after centring and must stay zero
    want = numpy_preprocess(x)
    fortran = np.asfortranarray(x.copy())
    for inp in (x, fortran, x[:, ::-1][:, ::-1], x.astype(np.float64)):
        before = inp.copy()
        out = preprocess_features(inp)
        np.testing.assert_allclose(out, want, atol=1e-6)
        np.testing.assert_array_equal(inp, before)  # never in place
        assert out.flags.c_contiguous
    assert preprocess_features(x).dtype == np.float32
    np.testing.assert_allclose(preprocess_features(x, center=False), numpy_preprocess(x, False),
                               atol=1e-6)


@pytest.mark.parametrize("solver", ["qning-miso", "auto", "sklearn"])
def test_weights_match_sklearn_on_a_small_problem(solver):
    x, y = blobs(20)
    x = preprocess_features(x)
    lambd = 0.1
    model = fit_logreg(x, y, lambd=lambd, solver=solver, tol=1e-9, max_iter=5000)
    ref = sklearn_fit(x, y, C=1 / lambd)
    assert model.lambda_1 == pytest.approx(lambd / len(y))
    scale = np.abs(ref.coef_).max()
    np.testing.assert_allclose(model.weights, ref.coef_.T, atol=1e-4 * scale)
    g = gradient(x, y, model.weights, model.lambda_1)
    assert np.abs(g).max() < 1e-5
    assert logreg_objective(x, y, model.weights, model.lambda_1) == pytest.approx(
        logreg_objective(x, y, ref.coef_.T, model.lambda_1), rel=1e-8)


@pytest.mark.parametrize("solver", [None, "sklearn"])
@pytest.mark.parametrize("lambd", [0.1, 2.5e-4])
def test_default_settings_accuracy_matches_sklearn(lambd, solver):
    x, y = blobs(5, classes=20, dim=48, sep=0.5)
    xv, yv = blobs(50, classes=20, dim=48, seed=1, sep=0.5)
    x, xv = preprocess_features(x), preprocess_features(xv)
    # the protocol's defaults (cyanure), and the fallback with its own default tolerance
    model = fit_logreg(x, y, lambd=lambd, **({"solver": solver} if solver else {}))
    ref = sklearn_fit(x, y, C=1 / lambd)
    ref_top1 = 100 * np.mean(ref.predict(xv) == yv)
    assert 20 < ref_top1 < 95  # a non-trivial problem
    assert abs(top1_accuracy(model, xv, yv) - ref_top1) <= 0.2


def test_lambda_not_per_sample_is_ibot_convention():
    x, y = blobs(8)
    x = preprocess_features(x, center=False)
    model = fit_logreg(x, y, lambd=0.01, per_sample=False, tol=1e-9, max_iter=5000)
    assert model.lambda_1 == 0.01
    ref = sklearn_fit(x, y, C=1 / (0.01 * len(y)))
    np.testing.assert_allclose(model.weights, ref.coef_.T, atol=1e-4 * np.abs(ref.coef_).max())


@pytest.mark.parametrize("solver", ["qning-miso", "sklearn"])
def test_two_classes_solve_the_multinomial_problem(solver):
    x, y = blobs(15, classes=2, sep=0.4)
    x = preprocess_features(x)
    model = fit_logreg(x, y, lambd=0.05, solver=solver, tol=1e-10, max_iter=5000)
    assert model.weights.shape == (32, 2)
    assert np.abs(gradient(x, y, model.weights, model.lambda_1)).max() < 1e-6


def test_arbitrary_labels_are_mapped_back():
    x, y = blobs(10, classes=3)
    x = preprocess_features(x)
    labels = np.array([3, 7, 11])[y]
    model = fit_logreg(x, labels, lambd=0.1, tol=1e-8)
    ref = sklearn_fit(x, labels, C=10.0)
    np.testing.assert_array_equal(model.classes, [3, 7, 11])
    np.testing.assert_array_equal(model.predict(x), ref.predict(x))
    with pytest.raises(ConfigError, match="at least 2 classes"):
        fit_logreg(x[:5], labels[:5] * 0, lambd=0.1)
    with pytest.raises(ConfigError, match="unknown solver"):
        fit_logreg(x, labels, lambd=0.1, solver="newton")


def test_select_lambda_uses_training_folds_only():
    x, y = blobs(6, sep=0.5)
    x = preprocess_features(x)
    lambdas = (1e-3, 0.1, 10.0)
    best, info = select_lambda(x, y, lambdas, folds=3, seed=0, tol=1e-8)
    assert info["folds"] == 3
    cv = StratifiedKFold(n_splits=3, shuffle=True, random_state=0)
    for lambd in lambdas:  # independent cross-validation with sklearn
        accs = [100 * np.mean(sklearn_fit(x[tr], y[tr], C=1 / lambd).predict(x[te]) == y[te])
                for tr, te in cv.split(x, y)]
        assert abs(info["cv_top1"][f"{lambd:g}"] - np.mean(accs)) <= 100 / 20 / 3 + 1e-9
    scores = {lam: info["cv_top1"][f"{lam:g}"] for lam in lambdas}
    assert scores[best] == max(scores.values())
    one, why = select_lambda(x[::6], y[::6], lambdas, folds=3)
    assert one is None and "single training image" in why["reason"]


def make_problem(shots=(1, 2, 5), classes=8, per_class=12, n_val=40):
    wn = [f"n{c:08d}" for c in range(classes)]
    keys = [f"{w}/{w}_{i:04d}.JPEG" for w in wn for i in range(per_class)]
    data = DatasetKeys("/train", tuple(wn), tuple(keys))
    x, y = blobs(per_class, classes=classes, dim=24, sep=0.8)
    xv, yv = blobs(n_val, classes=classes, dim=24, seed=1, sep=0.8)
    files = make_split_files(data, [Setting(shots=s) for s in shots], 2, seed=0)
    return data, x, y, xv, yv, files


def test_evaluate_splits_selects_rows_by_file_name():
    data, x, y, xv, yv, files = make_problem()
    order = np.random.default_rng(0).permutation(len(y))  # feature rows in another order
    keys = [data.keys[i] for i in order]
    runs = evaluate_splits(x[order], y[order], keys, xv, yv, files, lambdas=(0.1,),
                           per_sample=True, center=True, tol=1e-8)
    assert len(runs) == len(files)
    row = {k: i for i, k in enumerate(data.keys)}
    xp, xvp = numpy_preprocess(x), numpy_preprocess(xv)
    for r, sf in zip(runs, files):
        idx = [row[k] for k in sf.keys]
        ref = sklearn_fit(xp[idx], y[idx], C=10.0)
        assert r.n_train == len(idx) == sf.setting.shots * 8
        assert abs(r.top1 - 100 * np.mean(ref.predict(xvp) == yv)) <= 0.2 + 1e-9
        assert (r.file, r.sha256, r.split) == (sf.relpath, sf.sha256, sf.split)


def test_evaluate_with_selection_never_looks_at_val():
    data, x, y, xv, yv, files = make_problem(shots=(1, 5))
    kw = dict(lambdas=(0.01, 0.1, 1.0), per_sample=True, center=True, select=True,
              fallback_lambda=0.1, cv_folds=5)
    runs = evaluate_splits(x, y, list(data.keys), xv, yv, files, **kw)
    shuffled = evaluate_splits(x, y, list(data.keys), xv, np.random.default_rng(0).permutation(yv),
                               files, **kw)
    assert [r.lambd for r in runs] == [r.lambd for r in shuffled]
    one = [r for r in runs if r.setting.shots == 1]
    assert all(r.lambd == 0.1 and r.selection["selected"] == "fallback 0.1" for r in one)
    five = [r for r in runs if r.setting.shots == 5]
    assert all(r.selection["folds"] == 5 and r.lambd in (0.01, 0.1, 1.0) for r in five)


def test_summary_mean_and_population_std():
    runs = [RunScore(Setting(shots=1), s, 0.1, t, 10, "f", "h")
            for s, t in ((1, 55.226), (2, 55.4), (3, 55.064))]
    runs.append(RunScore(Setting(percent=1), 1, 0.1, 72.438, 128, "g", "h"))
    (one, pct) = summarise(runs)
    top1 = np.array([55.226, 55.4, 55.064])
    assert one["shots"] == 1 and one["mean"] == pytest.approx(top1.mean(), abs=1e-4)
    assert one["std"] == pytest.approx(np.sqrt(np.mean((top1 - top1.mean()) ** 2)), abs=1e-4)
    assert pct == {"percent": 1, "lambd": 0.1, "mean": 72.438, "std": 0.0, "n_splits": 1,
                   "n_train": 128.0}


def test_recipes_name_real_features_and_lambda_conventions():
    for name in ("moca", "msn", "ibot"):
        recipe = LOWSHOT_RECIPES.get(name)
        assert check_feature_name(recipe.feature) == recipe.feature
    assert LOWSHOT_RECIPES.get("ibot").default_lambda == 0.1
    with pytest.raises(ConfigError, match="did you mean"):
        LOWSHOT_RECIPES.get("mocca")


def test_cyanure_leaves_this_process_bf16_kernels_and_stdout_alone(capfd):
    """cyanure run in-process with 2 threads corrupts later bf16 CPU matmuls (garbage, NaN)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the corruption hit torch's second thread
    try:
        a, b = torch.randn(512, 384), torch.randn(384, 1536)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            before = (a @ b).float()
        x, y = blobs(20, classes=3)
        fit_logreg(preprocess_features(x), y, lambd=0.1, n_threads=2)
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert torch.equal((a @ b).float(), before)
    finally:
        torch.set_num_threads(threads)
    assert capfd.readouterr().out == ""
