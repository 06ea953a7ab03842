"""``moca-eval inspect``: what a checkpoint is, as the loader sees it; or the known layouts."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a checkpoint's detected layout and architecture, "
                       "or list the known layouts")
    p.add_argument("ckpt", type=Path, nargs="?", help="checkpoint to inspect (omit to list layouts)")
    p.add_argument("--checkpoint-key")
    p.add_argument("--format", dest="fmt")
    p.add_argument("--student", action="store_true")
    p.add_argument("--arch")
    p.add_argument("--num-heads", type=int)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moca_eval.checkpoint_formats import FORMATS
    from moca_eval.checkpoints import load_backbone

    if args.ckpt is None:
        for fmt in FORMATS:
            print(f"{fmt.name:20s} recipe={fmt.recipe:7s} {fmt.description}")
        return 0
    bb = load_backbone(args.ckpt, arch=args.arch, checkpoint_key=args.checkpoint_key,
                       fmt=args.fmt, student=args.student, img_size=None,
                       num_heads=args.num_heads)
    print(bb.summary())
    print(f"  sha256   {bb.sha256}")
    print(f"  recipe   {bb.recipe}")
    print(f"  arch     {bb.arch}")
    if bb.dropped:
        shown = ", ".join(bb.dropped[:6]) + (" ..." if len(bb.dropped) > 6 else "")
        print(f"  dropped  {shown}")
    return 0
