"""Low-shot glue: dataset + split files + backbone -> the feature arrays, and run metadata."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moca_eval.data import eval_transform
from moca_eval.features import check_feature_name, extract_features
from moca_eval.protocols.lowshot_logreg import solver_defaults
from moca_eval.protocols.splits import DatasetKeys, SplitFile, make_split_files
from moca_eval.protocols.splits_dir import load_split_dir
from moca_eval.results import backbone_info, provenance

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


def prepare(cfg, recipe, *, backbone=None) -> Prepared:
    """Index the data, check the splits (before any forward pass), extract features once."""
    train_index, val_index = cfg.job.data.splits()
    data = DatasetKeys.from_index(train_index)
    files, warnings = load_files(cfg, data)
    feature = check_feature_name(cfg.feature or recipe.feature)
    backbone = backbone or cfg.job.backbone.load()
    if backbone.student:
        log.warning("evaluating the student weights; the %s recipe uses the teacher", recipe.name)
    transform = eval_transform(backbone.arch.img_size, resize=cfg.job.data.resize,
                               interpolation=cfg.job.data.interpolation)
    if cfg.train_features == "splits":
        wanted = {k for sf in files for k in sf.keys}
        rows = [i for i, k in enumerate(data.keys) if k in wanted]
        train_index = train_index.subset(rows)
    train = extract_features(backbone, train_index, [feature], cfg.job.extract,
                             transform=transform)
    val = extract_features(backbone, val_index, [feature], cfg.job.extract, transform=transform)
    return Prepared(
        feature=feature, train_x=train.features[feature], train_y=train.labels,
        train_keys=[Path(p).as_posix() for p in train.paths], val_x=val.features[feature],
        val_y=val.labels, files=files, data=data, backbone=backbone, n_val=len(val),
        warnings=warnings, skipped=train.skipped + val.skipped)


def metadata(cfg, prep: Prepared, *, lambdas: tuple[float, ...], started: float) -> dict:
    """Provenance and every choice that affects the numbers (JSON-ready)."""
    library, tol, max_iter = solver_defaults(cfg.solver)
    files = {sf.relpath: {**sf.setting.as_json(), "split": sf.split, "images": len(sf.keys),
                          "sha256": sf.sha256, **({"short": sf.short} if sf.short else {})}
             for sf in prep.files}
    return {
        "checkpoint": backbone_info(prep.backbone),
        "dataset": {"root": str(cfg.job.data.root), "n_classes": len(prep.data.classes),
                    "n_train_images": len(prep.data.keys), "n_val": prep.n_val,
                    "skipped_images": prep.skipped},
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
        "config": {"shots": list(cfg.shots), "percents": list(cfg.percents),
                   "precision": cfg.job.extract.resolved_precision(),
                   "img_size": prep.backbone.arch.img_size,
                   "interpolation": cfg.job.data.interpolation,
                   "train_features": cfg.train_features},
        "wall_time_s": round(time.time() - started, 3),
        "provenance": provenance(),
    }
