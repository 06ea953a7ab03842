"""``moca-eval lowshot``: logistic regression on 1/2/5 images per class (and 1%) x 3 splits."""

from __future__ import annotations

import argparse
from pathlib import Path

from moca_eval.cli import common

COLUMNS = ["setting", "lambda", "split 1", "split 2", "split 3", "mean", "std", "n_train"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    from moca_eval.protocols.lowshot_settings import (
        DEFAULT_DTYPE,
        DEFAULT_MAX_ITER,
        DEFAULT_TOL,
        SKLEARN_MAX_ITER,
        SKLEARN_TOL,
        SOLVERS,
        TORCH_MAX_ITER,
        TORCH_TOL,
    )

    p = sub.add_parser(
        "lowshot", help="low-shot logistic regression (1/2/5-shot, 1%%) on frozen features",
        description="Low-shot ImageNet protocol of MOCA/MSN: cyanure multinomial logistic "
        "regression on frozen teacher features of n images per class, mean +- std over splits. "
        "The recipe follows the checkpoint's family: moca (avg-prenorm, lambda 0.1/N), msn "
        "(cls-prenorm, 2.5e-4/N), ibot (cls, L2 only, lambda 0.01/0.1/1 not divided by N), the "
        "others MSN's protocol on their CLS (`moca-eval recipes lowshot`).")
    common.add_backbone_args(p)
    common.add_data_args(p)
    p.set_defaults(interpolation=None)  # None: the recipe's (bilinear for moca/msn)
    g = p.add_argument_group("low-shot")
    g.add_argument("--recipe", help="low-shot recipe (default: the checkpoint family's; see "
                   "`moca-eval recipes lowshot`)")
    g.add_argument("--shots", type=int, nargs="*", default=[1, 2, 5],
                   help="images per class (default: 1 2 5)")
    g.add_argument("--percent", type=float, nargs="*", default=[],
                   help="percent of each class, e.g. 1 (the SimCLR/MSN 1%% setting)")
    g.add_argument("--splits", type=int, default=3, help="splits per setting (default 3)")
    g.add_argument("--split-dir", type=Path, help="published or generated split files "
                   "(imagenet_subsets{k}/{n}imgs_class.txt); default: generate from --seed")
    g.add_argument("--seed", type=int, default=0, help="seed of generated splits (default 0)")
    g.add_argument("--allow-short", action="store_true",
                   help="train on what exists when a class has fewer images than wanted")
    g.add_argument("--feature", help="feature variant (default: the recipe's)")
    g.add_argument("--lambd", type=float, nargs="+", help="lambda value(s) (default: recipe's)")
    g.add_argument("--select-lambda", action="store_true", help="pick one of several --lambd "
                   "per split by cross-validation on that split's training images (never val)")
    g.add_argument("--cv-folds", type=int, default=5, help="folds of --select-lambda (default 5)")
    g.add_argument("--solver", choices=SOLVERS,
                   help="solver (default: 'torch' when CUDA is available, else cyanure "
                   "'auto'): a cyanure name, 'torch' = float64 "
                   "L-BFGS on the GPU (or CPU), 'sklearn' = scikit-learn L-BFGS float64")
    g.add_argument("--dtype", default=DEFAULT_DTYPE, choices=["float32", "float64"],
                   help="cyanure precision (default %(default)s; float32 stops early with poor "
                   "accuracy: see BENCHMARKS.md)")
    g.add_argument("--tol", type=float, help=f"stop when the certified gap is <= tol x "
                   f"min(F(W), F(0) - F(W)) (default {DEFAULT_TOL:g}, torch {TORCH_TOL:g}); "
                   f"with --solver sklearn the L-BFGS gradient tolerance (default {SKLEARN_TOL:g})")
    g.add_argument("--max-iter", type=int, help=f"passes over the data (default cyanure "
                   f"{DEFAULT_MAX_ITER}, torch {TORCH_MAX_ITER}; sklearn: iterations, default "
                   f"{SKLEARN_MAX_ITER})")
    g.add_argument("--threads", type=int, default=-1, help="cyanure threads (-1: all cores)")
    g.add_argument("--train-features", default="splits", choices=["splits", "all"],
                   help="extract train features for the split images only (default) or for "
                   "the whole train set (reuses a cached full extraction)")
    common.add_runtime_args(p)
    common.add_output_arg(p)
    p.add_argument("--plot", type=Path, help="accuracy plot PNG (default: --output with .png)")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from moca_eval.protocols import lowshot

    job = common.feature_job(args)
    return lowshot.LowshotConfig(
        job=job, recipe=args.recipe, shots=tuple(args.shots), percents=tuple(args.percent),
        n_splits=args.splits, split_dir=args.split_dir, seed=args.seed, feature=args.feature,
        lambdas=tuple(args.lambd) if args.lambd else None, select_lambda=args.select_lambda,
        cv_folds=args.cv_folds, allow_short=args.allow_short,
        solver=args.solver or lowshot.DEFAULT_SOLVER, dtype=args.dtype, tol=args.tol,
        max_iter=args.max_iter, n_threads=args.threads, train_features=args.train_features)


def table_rows(result) -> list[dict]:
    """One row per (setting, lambda): every split's top-1, mean, std, training images."""
    rows: dict[tuple, dict] = {}
    for r in result.runs:
        lam = "selected" if r.selection else r.lambd
        row = rows.setdefault((r.setting, str(lam)), {"setting": r.setting.name,
                                                      "lambda": f"{lam:g}" if r.selection is None
                                                      else lam})
        row[f"split {r.split}"] = r.top1
    for (setting, lam), row in rows.items():
        s = next(s for s in result.summary
                 if s.get("shots") == setting.shots and s.get("percent") == setting.percent
                 and str(s["lambd"]) == lam)
        row.update(mean=s["mean"], std=s["std"], n_train=f"{s['n_train']:g}")
    return list(rows.values())


def run(args: argparse.Namespace) -> int:
    from moca_eval.protocols import lowshot
    from moca_eval.protocols.lowshot_plot import plot_lowshot

    cfg = config_from_args(args)
    result = lowshot.run(cfg)
    rows = table_rows(result)
    n_splits = max((r.split for r in result.runs), default=3)
    columns = [c for c in COLUMNS if not c.startswith("split ")]
    columns[2:2] = [f"split {k}" for k in range(1, n_splits + 1)]
    n_val = result.record.dataset["splits"][args.val_split]
    title = (f"low-shot logistic regression on {args.data} (recipe {result.recipe.name}, feature "
             f"{result.feature}, {n_val} val images; top-1 %)")
    payload = result.to_dict()
    common.emit(rows, columns, payload, args.output, title=title)
    plot = args.plot or (args.output.with_suffix(".png") if args.output else None)
    if plot is not None and common.is_main_process():
        plot_lowshot([payload], [Path(args.ckpt).stem], plot)
        print(f"plot written to {plot}")
    return 0
