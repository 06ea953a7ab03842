"""``moca-eval linear``: linear probing with a grid of heads (augmented paper mode or cached fast mode)."""

from __future__ import annotations

import argparse

from moca_eval.cli import common


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "linear", help="linear probe: a grid of heads on a frozen backbone (torchrun for multi-GPU)",
        description="Train one linear head per (feature, lr) from ONE backbone pass per batch, select "
        "the best on a held-out 10% of train, report its val top-1/top-5. Recipe values (see "
        "`moca-eval recipes`) can be overridden flag by flag. Launch with torchrun for DDP.")
    common.add_backbone_args(p)
    common.add_data_args(p)
    g = p.add_argument_group("linear probe")
    g.add_argument("--mode", choices=["augmented", "cached"], default="augmented",
                   help="augmented: RandomResizedCrop+flip each epoch (paper); cached: center-crop "
                   "features from the feature cache (fast)")
    g.add_argument("--recipe", help="linear recipe (default: the checkpoint family's; see "
                   "`moca-eval recipes linear`)")
    g.add_argument("--epochs", type=int, help="training epochs (default: the recipe's)")
    g.add_argument("--global-batch", type=int, help="global batch of the recipe (default 1024); reached "
                   "with gradient accumulation when --batch-size x processes is smaller")
    g.add_argument("--blr", type=float, help="train a single head per feature at this base lr")
    g.add_argument("--lrs", type=float, nargs="+", help="base lrs of the grid (default {1..9}x10^{-4..0})")
    g.add_argument("--single-head", action="store_true",
                   help="train one head per feature at the recipe's base lr (0.04 for moca)")
    g.add_argument("--features", nargs="+", help="feature variants (default cls avg cls+avg)")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up epochs (default: the recipe's)")
    g.add_argument("--head-norm", choices=["none", "bn"], help="bn: BatchNorm without affine (MAE)")
    g.add_argument("--optimizer", choices=["sgd", "lars"],
                   help="SGD with momentum, or MAE's LARS (trust 1e-3 on head weights; mae recipe)")
    g.add_argument("--select-on", choices=["holdout", "val"], default="holdout",
                   help="pick the reported head on a held-out part of train (default) or on val")
    g.add_argument("--holdout-fraction", type=float, default=0.1,
                   help="share of each class held out of training to select the head (default 0.1)")
    g.add_argument("--eval-every", type=int, default=0, help="also score the heads every N epochs")
    common.add_training_run_args(g, "linear")
    common.add_runtime_args(p)
    common.add_output_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moca_eval.protocols import linear

    single = (args.single_head or args.blr is not None) and not args.lrs
    overrides = dict(epochs=args.epochs, batch_size=args.global_batch, blr=args.blr,
                     lr_grid=() if single else (tuple(args.lrs) if args.lrs else None),
                     features=tuple(args.features) if args.features else None,
                     warmup_epochs=args.warmup_epochs, head_norm=args.head_norm, optimizer=args.optimizer)
    output_dir = args.output_dir or common.default_run_dir("linear", args.ckpt)
    cfg = linear.LinearConfig(job=common.feature_job(args), recipe=args.recipe, overrides=overrides,
                              mode=args.mode,
                              select_on=args.select_on, holdout_fraction=args.holdout_fraction,
                              output_dir=output_dir, resume=args.resume, eval_every=args.eval_every,
                              micro_batch=args.batch_size if args.mode == "augmented" else None,
                              seed=args.seed)
    result = linear.run(cfg)
    rows = [{"feature": h.feature, "base_lr": f"{h.base_lr:g}", "holdout_top1": h.holdout_top1 or "",
             "top1": h.val_top1, "top5": h.val_top5} for h in result.heads]
    sel = result.selected
    title = (f"linear probe ({result.mode} mode, {result.n_train} train / {result.n_holdout} held-out / "
             f"{result.n_val} val); selected on {result.select_on}: {sel.feature} @ base lr "
             f"{sel.base_lr:g}: top-1 {sel.val_top1:.2f}, top-5 {sel.val_top5:.2f}")
    common.emit(rows, ["feature", "base_lr", "holdout_top1", "top1", "top5"], result.to_dict(),
                args.output or output_dir / "results.json", title=title)
    return 0
