"""``moca-eval seg``: Cityscapes segmentation (Segmenter linear probe / fine-tuning on mmseg).

    moca-eval seg --ckpt teacher.pth --data CITYSCAPES --mode linear --train-size 100
    moca-eval seg split --data CITYSCAPES --size 100 --seed 12345   # the French et al. split
    moca-eval seg prepare --data CITYSCAPES                          # *_labelTrainIds.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moca_eval.cli import common
from moca_eval.errors import ConfigError
from moca_eval.install_dense import dense_stack

COLUMNS = ["split", "n_train", "iters", "mIoU", "aAcc", "mAcc"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("seg", help="Cityscapes segmentation: linear probe or fine-tuning (mmseg)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", nargs="?", default="train", choices=["train", "split", "prepare"],
                   help="train (default): train and evaluate; split: print a French et al. split; "
                   "prepare: write *_gtFine_labelTrainIds.png from *_gtFine_labelIds.png")
    p.add_argument("--data", type=Path, help="Cityscapes root (leftImg8bit/, gtFine/)")
    common.add_backbone_args(p, ckpt_required=False, img_size=False)
    g = p.add_argument_group("protocol (defaults: Segmenter's Cityscapes recipe, PROTOCOLS.md)")
    g.add_argument("--mode", default="linear", choices=["linear", "finetune"],
                   help="linear: frozen backbone + linear decoder; finetune: everything (default linear)")
    g.add_argument("--train-size", default="100", choices=["100", "372", "full"],
                   help="training images: French et al.'s 100 or 372 splits, or all 2975 (default 100)")
    g.add_argument("--split-seed", type=int, nargs="+", dest="split_seeds",
                   help="French et al. split seeds (default: 12345 23456 34567)")
    g.add_argument("--names", type=Path, help="train on the images listed in this file instead "
                   "(city/city_xxxxxx_yyyyyy per line); with `split`, split this list")
    g.add_argument("--lr", type=float, default=0.01, help="SGD lr (default 0.01; tune per method)")
    g.add_argument("--epochs", type=float, help="default: 100 (linear, 100/372 images) or 216")
    g.add_argument("--iters", type=int, help="training iterations (overrides --epochs)")
    g.add_argument("--global-batch", "--batch-size", dest="global_batch", type=int, default=8,
                   help="global batch over all processes (default 8; --batch-size is an old name)")
    g.add_argument("--crop-size", type=int, default=768, help="training crop and sliding window (768)")
    g.add_argument("--stride", type=int, help="sliding-window stride at evaluation, at most the crop "
                   "(default: 2/3 of --crop-size, Segmenter's 512 for 768)")
    g.add_argument("--resize-scale", type=int, nargs=2, default=[2048, 1024], metavar=("LONG", "SHORT"),
                   help="image scale before the 0.5-2.0 training jitter and at evaluation (2048 1024)")
    g.add_argument("--layer-decay", type=float, help="layer-wise lr decay (fine-tuning; default none)")
    g.add_argument("--seed", type=int, help="training randomness (default 0); `split` takes --split-seed")
    g.add_argument("--limit", type=float, help=common.DENSE_LIMIT_HELP)
    r = p.add_argument_group("runtime")
    r.add_argument("--output-dir", "--work-dir", dest="work_dir", type=Path,
                   help="run directory (default: runs/seg/<checkpoint name>-<sha256[:8]>)")
    r.add_argument("--resume", action="store_true", help="resume unfinished splits from their checkpoints")
    r.add_argument("--num-workers", type=int, default=4, help="data-loading processes (default 4)")
    r.add_argument("--save-every", type=int, default=2000, help="iterations between checkpoints")
    r.add_argument("--save-predictions", action="store_true", help="val predictions as PNG")
    r.add_argument("--output", type=Path, help="results JSON (default: WORK_DIR/results.json)")
    s = p.add_argument_group("split / prepare")
    s.add_argument("--size", type=int, help="split size for `split` (100 or 372)")
    s.add_argument("--overwrite", action="store_true", help="`prepare`: rewrite existing trainId files")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moca_eval.segmentation import cityscapes as cs

    if args.action == "split":
        return _split(args, cs)
    if args.data is None:
        raise ConfigError("--data CITYSCAPES_ROOT is required")
    if args.action == "prepare":
        written = cs.prepare_train_ids(args.data, overwrite=args.overwrite)
        print(f"wrote {written} *_gtFine_labelTrainIds.png file(s) under {args.data / 'gtFine'}")
        return 0
    return _train(args, cs)


def _split(args: argparse.Namespace, cs) -> int:
    if args.size is None or (args.data is None) == (args.names is None):
        raise ConfigError("`seg split` needs --size N and one of --data ROOT or --names FILE")
    if args.seed is not None:
        raise ConfigError("`seg split` takes the split seed as --split-seed (--seed is the training seed)")
    names = cs.read_names(args.names) if args.names else cs.train_names(args.data)
    for seed in args.split_seeds or cs.SPLIT_SEEDS[:1]:
        print("\n".join(cs.french_split(names, args.size, seed)))
    return 0


def _train(args: argparse.Namespace, cs) -> int:
    if args.ckpt is None:
        raise ConfigError("--ckpt is required to train")
    with dense_stack("segmentation"):
        from moca_eval.segmentation.plot import plot_per_class_iou
        from moca_eval.segmentation.run import SegConfig, run
    work_dir = args.work_dir or common.default_run_dir("seg", args.ckpt)
    cfg = SegConfig(
        backbone=common.backbone_config(args), data=args.data, mode=args.mode, train_size=args.train_size,
        split_seeds=tuple(args.split_seeds or cs.SPLIT_SEEDS), names_file=args.names, lr=args.lr,
        epochs=args.epochs, iters=args.iters, batch_size=args.global_batch, crop_size=args.crop_size,
        stride=args.stride, resize_scale=tuple(args.resize_scale), layer_decay=args.layer_decay,
        work_dir=work_dir, resume=args.resume,
        num_workers=args.num_workers, save_every=args.save_every, save_predictions=args.save_predictions,
        seed=args.seed or 0, limit=args.limit).validate()
    result = run(cfg)
    payload = result.to_dict()
    rows = [{"split": s.split, "n_train": s.n_train, "iters": s.iters, "mIoU": s.miou, "aAcc": s.aacc,
             "mAcc": s.macc} for s in result.splits]
    output = args.output or work_dir / "results.json"
    common.emit(rows, COLUMNS, payload, output,
                title=f"Cityscapes {result.mode}, train set {result.train_size}: mIoU "
                      f"{result.miou_mean:.2f} +- {result.miou_std:.2f} over {len(result.splits)} split(s)")
    if common.is_main_process():
        print(f"per-class IoU chart: {plot_per_class_iou(payload, output.with_suffix('.png'))}")
    return 0
