"""Low-shot glue: dataset + split files + backbone -> the feature arrays, and run metadata."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moca_eval.data import ImageFolderIndex, eval_transform
from moca_eval.features import check_feature_name, extract_features
from moca_eval.protocols.lowshot_logreg import solver_defaults
from moca_eval.protocols.splits import DatasetKeys, SplitFile, make_split_files
from moca_eval.protocols.splits_dir import load_split_dir

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything ``lowshot.run`` fits on."""

    feature: str
    train_x: np.ndarray
    train_y: np.ndarray
    train_keys: list[str]
    val_x: np.ndarray
    val_y: np.ndarray
    files: list[SplitFile]
    data: DatasetKeys
    backbone: object
    n_val: int
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def load_files(cfg, data: DatasetKeys) -> tuple[list[SplitFile], list[str]]:
    """The split files: read from ``cfg.split_dir`` or generated from ``cfg.seed``."""
    if cfg.split_dir is not None:
        return load_split_dir(cfg.split_dir, data, cfg.settings(), cfg.n_splits,
                              allow_short=cfg.allow_short)
    files = make_split_files(data, cfg.settings(), cfg.n_splits, seed=cfg.seed,
                             allow_short=cfg.allow_short)
    return files, []


@dataclass
class Indexed:
    """The dataset and split files, checked before any checkpoint is loaded."""

    train_index: ImageFolderIndex
    val_index: ImageFolderIndex
    data: DatasetKeys
    files: list[SplitFile]
    warnings: list[str]


def index(cfg) -> Indexed:
    """Index the data and read or generate the split files (cheap checks, no forward pass)."""
    train_index, val_index = cfg.job.data.splits()
    data = DatasetKeys.from_index(train_index)
    files, warnings = load_files(cfg, data)
    return Indexed(train_index, val_index, data, files, warnings)


def prepare(cfg, recipe, backbone, indexed: Indexed) -> Prepared:
    """Extract the features the splits need, once (train: split images only, or all)."""
    feature = check_feature_name(cfg.feature or recipe.feature)
    if backbone.student:
        log.warning("evaluating the student weights; the %s recipe uses the teacher", recipe.name)
    transform = eval_transform(backbone.arch.img_size, resize=cfg.job.data.resize,
                               interpolation=interpolation(cfg, recipe))
    train_index = indexed.train_index
    if cfg.train_features == "splits":
        wanted = {k for sf in indexed.files for k in sf.keys}
        train_index = train_index.subset([i for i, k in enumerate(indexed.data.keys) if k in wanted])
    train = extract_features(backbone, train_index, [feature], cfg.job.extract, transform=transform)
    val = extract_features(backbone, indexed.val_index, [feature], cfg.job.extract, transform=transform)
    return Prepared(
        feature=feature, train_x=train.features[feature], train_y=train.labels,
        train_keys=[Path(p).as_posix() for p in train.paths], val_x=val.features[feature],
        val_y=val.labels, files=indexed.files, data=indexed.data, backbone=backbone, n_val=len(val),
        warnings=indexed.warnings, skipped=train.skipped + val.skipped)


def interpolation(cfg, recipe) -> str:
    """The eval resize interpolation: the data config's if set, else the recipe's."""
    return cfg.job.data.interpolation or recipe.interpolation


def config_block(cfg, prep: Prepared, recipe, *, lambdas: tuple[float, ...], why: str) -> dict:
    """Every choice that affects the numbers (the record's ``config``)."""
    library, tol, max_iter = solver_defaults(cfg.solver)
    files = {sf.relpath: {**sf.setting.as_json(), "split": sf.split, "images": len(sf.keys),
                          "sha256": sf.sha256, **({"short": sf.short} if sf.short else {})}
             for sf in prep.files}
    from moca_eval.protocols.lowshot import LOWSHOT_RECIPES_VERSION
    from moca_eval.record import recipe_block

    return {
        "recipe": recipe_block(recipe.name, recipe, why=why, version=LOWSHOT_RECIPES_VERSION),
        "feature": prep.feature,
        "splits": {"source": "dir" if cfg.split_dir else "generated",
                   "dir": str(cfg.split_dir) if cfg.split_dir else None,
                   "seed": None if cfg.split_dir else cfg.seed, "n_splits": cfg.n_splits,
                   "allow_short": cfg.allow_short,
                   "short_classes": sum(len(sf.short) for sf in prep.files),
                   "warnings": prep.warnings, "files": files},
        "classifier": {"library": library,
                       "loss": "multiclass-logistic", "penalty": "l2", "fit_intercept": False,
                       "solver": cfg.solver, "dtype": cfg.dtype, "tol": cfg.tol or tol,
                       "max_iter": cfg.max_iter or max_iter, "lambdas": list(lambdas),
                       "select_lambda": cfg.select_lambda, "cv_folds": cfg.cv_folds},
        "shots": list(cfg.shots), "percents": list(cfg.percents),
        "precision": cfg.job.extract.resolved_precision(), "img_size": prep.backbone.arch.img_size,
        "interpolation": interpolation(cfg, recipe), "train_features": cfg.train_features,
    }
