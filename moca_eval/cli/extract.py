"""``moca-eval extract``: export features (the feature cache made visible) to ``.npz``."""

from __future__ import annotations

import argparse
from pathlib import Path

from moca_eval.cli import common


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="write features, labels and paths of one split to .npz")
    common.add_backbone_args(p)
    common.add_data_args(p)
    p.add_argument("--split", default="val", help="which split folder to extract (default: val)")
    p.add_argument("--feature", help="feature variant (cls, avg, cls+avg, avg-prenorm, cls-prenorm, "
                   "cls-lastN; default: the checkpoint family's, avg for MOCA, cls for the others)")
    p.add_argument("--output", type=Path, required=True, help="output .npz")
    common.add_runtime_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from moca_eval.data import eval_transform, load_split
    from moca_eval.families import FAMILIES, announce
    from moca_eval.features import check_feature_name, extract_features
    from moca_eval.results import atomic_path

    job = common.feature_job(args)
    if args.feature is not None:
        check_feature_name(args.feature)
    backbone = job.backbone.load()
    feature = check_feature_name(args.feature or FAMILIES.get(backbone.family).feature)
    announce("extract", backbone.family_choice, f"{backbone.family} (feature {feature})",
             "--feature" if args.feature else f"family {backbone.family}")
    classes = load_split(args.data, args.train_split).classes if args.split != args.train_split \
        and (args.data / args.train_split).is_dir() else None
    index = load_split(args.data, args.split, classes=classes)
    transform = eval_transform(backbone.arch.img_size, resize=args.resize,
                               interpolation=args.interpolation)
    feats = extract_features(backbone, index, [feature], job.extract, transform=transform)
    if not common.is_main_process():
        return 0
    with atomic_path(args.output) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, features=feats.features[feature], labels=feats.labels,
                     paths=np.asarray(feats.paths), classes=np.asarray(feats.classes))
    print(f"{len(feats)} x {feats.features[feature].shape[1]} {feature} features of "
          f"{args.data / args.split} written to {args.output}"
          + (f" ({len(feats.skipped)} undecodable images skipped)" if feats.skipped else ""))
    return 0
