"""Low-shot ImageNet classification with logistic regression (MOCA Sec. 4.4 / C.3; MSN).

Frozen (teacher) features of the 1/2/5 images per class of each split (and of 1% of each
class) train an L2-regularised multinomial logistic regression (cyanure, no intercept, rows
centred then L2-normalised); top-1 on the whole val set, mean and std over the splits.

Train features are extracted once, for the union of the split images (or for the whole
train set, reusing a k-NN run's cache), and every split selects its rows by file name. Lambda is
fixed by the recipe; with several lambdas every one is reported, unless ``select_lambda``
picks one per split by cross-validation on that split's training images (never on val).

Recipes (``LOWSHOT_RECIPES``, version ``LOWSHOT_RECIPES_VERSION``):
- ``moca`` (default, the MOCA paper): ``avg-prenorm``, lambda 0.1 / N, centred + L2.
- ``msn`` (MSN logistic_eval.py): ``cls-prenorm``, lambda 2.5e-4 / N, centred + L2.
- ``ibot`` (iBOT eval_logistic_regression.py): ``cls``, L2 only, lambda in {0.01, 0.1, 1}
  given to cyanure as is (not divided by N).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from moca_eval.errors import ConfigError, DatasetError
from moca_eval.families import announce, recipe_name
from moca_eval.pipeline import FeatureJob, dataset_info
from moca_eval.protocols.lowshot_logreg import (
    DEFAULT_DTYPE,
    DEFAULT_SOLVER,
    SOLVERS,
    DType,
    fit_logreg,
    preprocess_features,
    top1_accuracy,
)
from moca_eval.protocols.splits import Setting, SplitFile
from moca_eval.record import Clock, Record, checkpoint_block, metrics_block, split_summary
from moca_eval.registry import Registry

__all__ = ["LOWSHOT_RECIPES", "LOWSHOT_RECIPES_VERSION", "LowshotConfig", "LowshotRecipe",
           "LowshotResult", "RunScore", "evaluate_splits", "fit_logreg", "preprocess_features",
           "run", "select_lambda", "summarise"]

log = logging.getLogger(__name__)

LOWSHOT_RECIPES_VERSION = 2  # 2: recipes for dino, mae, dinov2, mocov3, timm


@dataclass(frozen=True)
class LowshotRecipe:
    """One project's low-shot logistic-regression protocol."""

    name: str
    feature: str
    lambdas: tuple[float, ...]
    per_sample: bool  # cyanure lambda_1 = lambd / N (else lambd)
    center: bool  # row-centre before L2 normalisation
    interpolation: str  # eval resize interpolation
    description: str

    @property
    def default_lambda(self) -> float:
        """Used when a lambda cannot be selected (1 image per class): the middle of the grid."""
        return sorted(self.lambdas)[len(self.lambdas) // 2]


LOWSHOT_RECIPES: Registry[LowshotRecipe] = Registry("low-shot recipe")
_MSN_PROTOCOL = ("lambda 2.5e-4 (lambda_1 = lambd/N), rows centred then L2-normalised, bilinear resize: "
                 "MSN's logistic_eval.py protocol, which MSN and MOCA used to compare other methods")
for _r in (
    LowshotRecipe("moca", "avg-prenorm", (0.1,), True, True, "bilinear",
                  "MOCA paper and release: teacher, mean of last-block patch tokens without the "
                  "final LN, lambda 0.1 (lambda_1 = 0.1/N), rows centred then L2-normalised"),
    LowshotRecipe("msn", "cls-prenorm", (2.5e-4,), True, True, "bilinear",
                  "MSN logistic_eval.py: target-encoder CLS without the final LN, lambda 2.5e-4 "
                  "(lambda_1 = lambd/N; the README says 2.5e-3), centred then L2-normalised"),
    LowshotRecipe("ibot", "cls", (0.01, 0.1, 1.0), False, False, "bicubic",
                  "iBOT eval_logistic_regression.py: final-LN CLS, L2-normalised only, "
                  "lambda_1 in {0.01, 0.1, 1} NOT divided by N"),
    *(LowshotRecipe(name, "cls", (2.5e-4,), True, True, "bilinear",
                    f"{who} published no low-shot logistic regression: final-LN CLS with {_MSN_PROTOCOL}")
      for name, who in (("dino", "DINO"), ("mae", "MAE"), ("dinov2", "DINOv2"), ("mocov3", "MoCo-v3"),
                        ("timm", "generic fallback (timm/unknown):"))),
):
    LOWSHOT_RECIPES.register(_r.name, _r)


@dataclass(frozen=True)
class LowshotConfig:
    """Low-shot settings; ``None`` fields take the recipe's value.

    ``job.data.interpolation`` is used as given (the CLI fills in the recipe's, bilinear for
    moca/msn). ``percents`` is empty by default (the 1% setting is opt-in: ``(1.0,)``).
    """

    job: FeatureJob
    recipe: str | None = None  # None: the checkpoint family's
    shots: tuple[int, ...] = (1, 2, 5)
    percents: tuple[float, ...] = ()
    n_splits: int = 3
    split_dir: str | None = None  # published/generated split files; None: generate from seed
    seed: int = 0
    feature: str | None = None
    lambdas: tuple[float, ...] | None = None
    select_lambda: bool = False
    cv_folds: int = 5
    allow_short: bool = False
    solver: str = DEFAULT_SOLVER
    dtype: DType = DEFAULT_DTYPE
    tol: float | None = None  # None: the solver's default (cyanure 1e-3, sklearn 1e-8)
    max_iter: int | None = None
    n_threads: int = -1
    train_features: Literal["splits", "all"] = "splits"  # extract split images only, or all

    def settings(self) -> list[Setting]:
        return [Setting(shots=s) for s in self.shots] + [Setting(percent=p) for p in self.percents]

    def check(self) -> None:
        """Raise ConfigError for values no run could use."""
        if not self.shots and not self.percents:
            raise ConfigError("nothing to evaluate: give --shots and/or --percent")
        self.settings()  # each Setting checks its shots/percent
        if self.n_splits < 1:
            raise ConfigError(f"--splits must be >= 1, got {self.n_splits}")
        if self.recipe is not None:
            LOWSHOT_RECIPES.canonical(self.recipe)
        if self.solver not in SOLVERS:
            raise ConfigError(f"unknown solver {self.solver!r} (known: {', '.join(SOLVERS)})")
        if self.lambdas is not None and (not self.lambdas or not all(0 < v < math.inf for v in self.lambdas)):
            raise ConfigError(f"--lambd values must be positive and finite, got {list(self.lambdas)}")
        if self.cv_folds < 2:
            raise ConfigError("--cv-folds must be >= 2")
        if (self.tol is not None and self.tol <= 0) or (self.max_iter is not None
                                                         and self.max_iter < 1):
            raise ConfigError("--tol must be > 0 and --max-iter >= 1")


@dataclass(frozen=True)
class RunScore:
    """Top-1 of one (setting, split, lambda)."""

    setting: Setting
    split: int
    lambd: float
    top1: float
    n_train: int
    file: str
    sha256: str
    converged: bool = True
    selection: dict | None = None  # cross-validation details when lambda was selected
    fit: dict | None = None  # final objective, certified gap, passes (LogRegModel.fit_record)

    def as_json(self) -> dict:
        out = {**self.setting.as_json(), "split": self.split, "top1": round(self.top1, 4),
               "n_train": self.n_train, "lambd": self.lambd, "file": self.file,
               "sha256": self.sha256, "converged": self.converged,
               **({"fit": self.fit} if self.fit else {})}
        return {**out, "lambda_selection": self.selection} if self.selection else out


@dataclass
class LowshotResult:
    runs: list[RunScore]
    summary: list[dict]
    feature: str
    recipe: LowshotRecipe
    record: Record

    def to_dict(self) -> dict:
        return self.record.to_dict()


def select_lambda(x: np.ndarray, y: np.ndarray, lambdas: Sequence[float], *, folds: int,
                  seed: int = 0, **fit_kw) -> tuple[float | None, dict]:
    """Lambda with the best stratified k-fold accuracy on (x, y) alone; ties: larger lambda.

    ``k = min(folds, fewest images of a class)``; returns ``(None, details)`` when a class
    has a single image (nothing to hold out).
    """
    from sklearn.model_selection import StratifiedKFold

    counts = np.unique(y, return_counts=True)[1]
    k = int(min(folds, counts.min()))
    if k < 2:
        return None, {"reason": "a class has a single training image: nothing to hold out"}
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    scores = {}
    for lambd in lambdas:
        accs = [top1_accuracy(fit_logreg(x[tr], y[tr], lambd=lambd, **fit_kw), x[te], y[te])
                for tr, te in cv.split(x, y)]
        scores[lambd] = float(np.mean(accs))
    best = max(lambdas, key=lambda lam: (scores[lam], lam))
    return best, {"folds": k, "cv_top1": {f"{lam:g}": round(s, 4) for lam, s in scores.items()}}


def evaluate_splits(
    train_x: np.ndarray, train_y: np.ndarray, train_keys: Sequence[str],
    val_x: np.ndarray, val_y: np.ndarray, files: Sequence[SplitFile], *,
    lambdas: Sequence[float], per_sample: bool, center: bool, select: bool = False,
    fallback_lambda: float | None = None, cv_folds: int = 5, seed: int = 0, **fit_kw,
) -> list[RunScore]:
    """Train on each split file's rows of ``train_x`` (by key), score on all of val.

    Features are preprocessed here (once). ``fit_kw`` goes to :func:`fit_logreg`.
    """
    row_of = {k: i for i, k in enumerate(train_keys)}
    absent = sorted({k for sf in files for k in sf.keys if k not in row_of})
    if absent:
        raise DatasetError(f"no features for {len(absent)} split image(s) (undecodable?): "
                           f"{', '.join(absent[:5])}")
    xt = preprocess_features(train_x, center=center)
    xv = preprocess_features(val_x, center=center)
    fit_kw = {"per_sample": per_sample, **fit_kw}
    out = []
    for sf in files:
        rows = np.array([row_of[k] for k in sf.keys])
        x, y = xt[rows], np.asarray(train_y)[rows]
        todo, selection = list(lambdas), None
        if select and len(lambdas) > 1:
            best, selection = select_lambda(x, y, lambdas, folds=cv_folds, seed=seed, **fit_kw)
            todo = [best if best is not None else _closest(lambdas, fallback_lambda)]
            selection["selected"] = todo[0] if best is not None else f"fallback {todo[0]:g}"
        for lambd in todo:
            model = fit_logreg(x, y, lambd=lambd, **fit_kw)
            score = RunScore(sf.setting, sf.split, lambd, top1_accuracy(model, xv, val_y),
                             len(rows), sf.relpath, sf.sha256, model.converged, selection,
                             model.fit_record())
            log.info("%s split %d lambda %g: top-1 %.2f (%d train images)", sf.setting.name,
                     sf.split, lambd, score.top1, len(rows))
            out.append(score)
    return out


def _closest(lambdas: Sequence[float], target: float | None) -> float:
    if target is None:
        return sorted(lambdas)[len(lambdas) // 2]
    return min(lambdas, key=lambda lam: abs(math.log(lam / target)))


def summarise(runs: Sequence[RunScore], *, selected: bool = False) -> list[dict]:
    """Mean and population std (ddof=0, as MOCA reports) of top-1 over splits, per setting
    (and per lambda unless lambdas were selected per split)."""
    groups: dict[tuple, list[RunScore]] = {}
    for r in runs:
        groups.setdefault((r.setting, None if selected else r.lambd), []).append(r)
    out = []
    for (setting, lambd), group in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1] or 0)):
        top1 = np.array([r.top1 for r in group])
        out.append({**setting.as_json(), "lambd": "selected" if selected else lambd,
                    "mean": round(float(top1.mean()), 4), "std": round(float(top1.std()), 4),
                    "n_splits": len(group),
                    "n_train": round(float(np.mean([r.n_train for r in group])), 1)})
    return out


def run(cfg: LowshotConfig, *, backbone=None) -> LowshotResult:
    """Check the data and splits, load the checkpoint, extract features once, fit every split."""
    from moca_eval.protocols import lowshot_data

    cfg.check()
    clock = Clock()
    indexed = lowshot_data.index(cfg)
    backbone = backbone or cfg.job.backbone.load()
    name, why = recipe_name("lowshot", backbone.family, cfg.recipe)
    recipe = LOWSHOT_RECIPES.get(name)
    announce("lowshot", backbone.family_choice, recipe.name, why)
    lambdas = tuple(cfg.lambdas or recipe.lambdas)
    if cfg.select_lambda and len(lambdas) == 1:
        log.warning("--select-lambda with a single lambda (%g): nothing to select", lambdas[0])
    prepared = lowshot_data.prepare(cfg, recipe, backbone, indexed)
    runs = evaluate_splits(
        prepared.train_x, prepared.train_y, prepared.train_keys, prepared.val_x, prepared.val_y,
        prepared.files, lambdas=lambdas, per_sample=recipe.per_sample, center=recipe.center,
        select=cfg.select_lambda, fallback_lambda=recipe.default_lambda, cv_folds=cfg.cv_folds,
        seed=cfg.seed, solver=cfg.solver, dtype=cfg.dtype, tol=cfg.tol, max_iter=cfg.max_iter,
        n_threads=cfg.n_threads)
    selected = cfg.select_lambda and len(lambdas) > 1
    summary = summarise(runs, selected=selected)
    record = Record(
        "lowshot", checkpoint_block(backbone),
        dataset_info(cfg.job, (indexed.train_index, indexed.val_index), skipped=prepared.skipped),
        lowshot_data.config_block(cfg, prepared, recipe, lambdas=lambdas, why=why),
        lowshot_metrics(runs, summary), clock.provenance())
    return LowshotResult(runs, summary, prepared.feature, recipe, record)


def lowshot_metrics(runs: Sequence[RunScore], summary: Sequence[dict]) -> dict:
    """The record's ``metrics``: one ``splits`` entry per (setting, lambda), headline = the first."""
    several = len({str(s["lambd"]) for s in summary}) > 1
    splits = []
    for s in summary:
        setting = Setting(shots=s.get("shots"), percent=s.get("percent"))
        label = setting.name + (f" lambda {s['lambd']:g}" if several else "")
        values = [r.top1 for r in sorted(runs, key=lambda r: r.split) if r.setting == setting
                  and (s["lambd"] == "selected" or r.lambd == s["lambd"])]
        splits.append(split_summary(label, values, shots=setting.shots, percent=setting.percent,
                                    lambd=s["lambd"], n_train=s["n_train"]))
    head = splits[0] if splits else None
    return metrics_block(f"top1 {head['setting']} (mean over splits)" if head else "top1",
                         head["mean"] if head else None, headline_std=head["std"] if head else None,
                         values={s["setting"]: s["mean"] for s in splits},
                         rows=[r.as_json() for r in runs], splits=splits)
