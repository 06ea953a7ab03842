"""``moca-eval demo-data``: write the procedural demo dataset."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo-data", help="generate the built-in demo dataset (ImageFolder)")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images (default 0)")
    p.add_argument("--train-per-class", type=int, default=40, help="train images per class (default 40)")
    p.add_argument("--val-per-class", type=int, default=10, help="val images per class (default 10)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default 64)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moca_eval.demo import make_demo_data

    out = make_demo_data(args.out, seed=args.seed, train_per_class=args.train_per_class,
                         val_per_class=args.val_per_class, image_size=args.image_size)
    print(f"demo dataset written to {out} (train/ and val/, 10 classes)")
    return 0
