"""``moca-eval det``: COCO detection and instance segmentation (Cascade Mask R-CNN on mmdet).

    moca-eval det --ckpt teacher.pth --data COCO_ROOT                  # 1x: 12 epochs, batch 16
    moca-eval det --ckpt teacher.pth --data COCO_ROOT --resume         # continue after a stop
    moca-eval det --ckpt teacher.pth --data COCO_ROOT --eval-only --weights runs/det/x/epoch_12.pth
    torchrun --nproc-per-node 8 -m moca_eval det --ckpt teacher.pth --data COCO_ROOT

COCO_ROOT: annotations/instances_{train,val}2017.json, train2017/, val2017/.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

from moca_eval.cli import common
from moca_eval.errors import ConfigError
from moca_eval.install_dense import dense_stack

COLUMNS = ["task", "AP", "AP50", "AP75", "APs", "APm", "APl"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("det", help="COCO detection / instance segmentation: Cascade Mask R-CNN (mmdet)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="COCO root (annotations/, train2017/, val2017/)")
    common.add_backbone_args(p, img_size=False)
    g = p.add_argument_group("protocol (defaults: iBOT's Cascade Mask R-CNN 1x recipe, PROTOCOLS.md)")
    g.add_argument("--epochs", type=int, default=12, help="12 = 1x (lr /10 after 2/3 and 11/12 of them)")
    g.add_argument("--lr", type=float, default=2e-4, help="AdamW lr for batch 16 (paper 2e-4; iBOT 1e-4)")
    g.add_argument("--layer-decay", type=float, default=0.75, help="layer-wise lr decay (iBOT ViT-B: 0.75)")
    g.add_argument("--global-batch", type=int, default=16,
                   help="global batch, reached by gradient accumulation when --batch-size x processes "
                   "is smaller (default 16)")
    g.add_argument("--batch-size", type=int, default=2, help="images per process and step (default 2)")
    g.add_argument("--drop-path", type=float, default=0.2, dest="drop_path_rate",
                   help="stochastic depth rate of the backbone (default 0.2, ViTDet/MAE)")
    g.add_argument("--no-random-crop", action="store_true", help="multi-scale training without the "
                   "DETR-style random-crop branch")
    g.add_argument("--train-sizes", type=int, nargs="+", metavar="SHORT",
                   help="training short sides, one drawn per image (default 480 512 ... 800)")
    g.add_argument("--test-size", type=int, default=800, help="evaluation short side (default 800); the "
                   "crop branch's 400-600 and 384-600 scale with it")
    g.add_argument("--max-size", type=int, default=1333, help="longest side, training and test (1333)")
    g.add_argument("--warmup-iters", type=int, default=500, help="linear warm-up, optimizer steps (500)")
    g.add_argument("--seed", type=int, default=0, help="training randomness (default 0)")
    g.add_argument("--limit", type=float, help=common.DENSE_LIMIT_HELP)
    r = p.add_argument_group("runtime")
    r.add_argument("--output-dir", "--work-dir", dest="work_dir", type=Path,
                   help="run directory (default: runs/det/<checkpoint name>-<sha256[:8]>)")
    r.add_argument("--resume", action="store_true", help="resume from the last epoch checkpoint in WORK_DIR")
    r.add_argument("--eval-only", action="store_true", help="only evaluate the detector in --weights")
    r.add_argument("--weights", type=Path, help="with --eval-only: a checkpoint written by `moca-eval det`")
    r.add_argument("--with-cp", action="store_true", help="activation checkpointing (less GPU memory)")
    r.add_argument("--num-workers", type=int, default=4, help="data-loading processes (default 4)")
    r.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE", help="override any value of the mmdet "
                   "config by dotted key, e.g. model.test_cfg.rcnn.score_thr=0.3 (Python literals)")
    r.add_argument("--output", type=Path, help="results JSON (default: WORK_DIR/results.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with dense_stack("detection"):
        from moca_eval.detection.run import DetConfig, run
    work_dir = args.work_dir or common.default_run_dir("det", args.ckpt)
    cfg = DetConfig(
        backbone=common.backbone_config(args), data=args.data, epochs=args.epochs, lr=args.lr,
        layer_decay=args.layer_decay, batch_size=args.global_batch, per_gpu_batch=args.batch_size,
        drop_path_rate=args.drop_path_rate, random_crop=not args.no_random_crop,
        train_short_sides=tuple(args.train_sizes or DetConfig.train_short_sides),
        test_short_side=args.test_size, max_long_side=args.max_size, warmup_iters=args.warmup_iters,
        work_dir=work_dir, resume=args.resume, eval_only=args.eval_only, weights=args.weights,
        with_cp=args.with_cp, num_workers=args.num_workers, seed=args.seed,
        cfg_options=parse_cfg_options(args.cfg_options or []), limit=args.limit)
    result = run(cfg)
    payload = result.to_dict()
    rows = [{"task": task, **getattr(result, task)} for task in ("bbox", "segm")]
    output = args.output or work_dir / ("eval_results.json" if args.eval_only else "results.json")
    common.emit(rows, COLUMNS, payload, output,
                title=f"COCO val: AP box {result.bbox['AP']:.1f}, AP mask {result.segm['AP']:.1f}")
    if common.is_main_process() and result.preview:
        print(f"predictions drawn on val images: {result.preview}")
    return 0


def parse_cfg_options(items: list[str]) -> dict:
    """``KEY=VALUE`` strings as a dict; values read as Python literals where they parse."""
    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--cfg-options {item!r}: expected KEY=VALUE")
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    return options
