"""``moca-eval finetune``: end-to-end fine-tuning with the BEiT/MAE recipe (timm building blocks)."""

from __future__ import annotations

import argparse

from moca_eval.cli import common


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="full fine-tuning (AdamW + layer decay, RandAugment, mixup; torchrun for DDP)",
        description="Fine-tune the whole ViT with a recipe from `moca-eval recipes` (default: the MOCA "
        "paper's), overridable flag by flag. Reports best and last val top-1/top-5.")
    common.add_backbone_args(p)
    common.add_data_args(p)
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--recipe", help="fine-tuning recipe (default: the checkpoint family's; see "
                   "`moca-eval recipes finetune`)")
    g.add_argument("--epochs", type=int, help="training epochs (default: the recipe's)")
    g.add_argument("--global-batch", type=int, help="global batch (default 1024), reached with gradient "
                   "accumulation when --batch-size x processes is smaller")
    g.add_argument("--blr", type=float, help="base lr; lr = blr x global batch / 256")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up epochs (default: the recipe's)")
    g.add_argument("--min-lr", type=float, help="final lr of the cosine schedule (default: the recipe's)")
    g.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: the recipe's)")
    g.add_argument("--layer-decay", type=float, help="layer-wise lr decay (default: the recipe's)")
    g.add_argument("--drop-path", type=float, help="stochastic depth rate (default: the recipe's)")
    g.add_argument("--smoothing", type=float, help="label smoothing (default: the recipe's)")
    g.add_argument("--mixup", type=float, help="mixup alpha, 0 disables (default: the recipe's)")
    g.add_argument("--cutmix", type=float, help="cutmix alpha, 0 disables (default: the recipe's)")
    g.add_argument("--aa", help="timm RandAugment policy, or 'none'")
    g.add_argument("--reprob", type=float, help="random erasing probability")
    g.add_argument("--global-pool", choices=["avg", "token"],
                   help="classifier input: mean of the patch tokens or the CLS token (default: the recipe's)")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate on val every N epochs (default 1)")
    common.add_training_run_args(g, "finetune")
    common.add_runtime_args(p)
    common.add_output_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moca_eval.protocols import finetune

    aa = None if args.aa is None else ("" if args.aa.lower() == "none" else args.aa)
    overrides = dict(
        epochs=args.epochs, batch_size=args.global_batch, blr=args.blr,
        warmup_epochs=args.warmup_epochs, min_lr=args.min_lr, weight_decay=args.weight_decay,
        layer_decay=args.layer_decay, drop_path=args.drop_path, smoothing=args.smoothing, mixup=args.mixup,
        cutmix=args.cutmix, auto_augment=aa, reprob=args.reprob, global_pool=args.global_pool)
    output_dir = args.output_dir or common.default_run_dir("finetune", args.ckpt)
    cfg = finetune.FinetuneConfig(job=common.feature_job(args), recipe=args.recipe, overrides=overrides,
                                  output_dir=output_dir,
                                  resume=args.resume, eval_every=args.eval_every, seed=args.seed)
    result = finetune.run(cfg)
    rows = [{"epoch": h["epoch"], "top1": h["top1"], "top5": h["top5"]} for h in result.history]
    title = (f"fine-tuning ({result.n_train} train / {result.n_val} val, recipe "
             f"{result.record.config['recipe']['name']}): best top-1 "
             f"{result.best_top1:.2f} (epoch {result.best_epoch}), last top-1 {result.last_top1:.2f}, "
             f"top-5 {result.last_top5:.2f}")
    common.emit(rows, ["epoch", "top1", "top5"], result.to_dict(), args.output or output_dir / "results.json",
                title=title)
    return 0
