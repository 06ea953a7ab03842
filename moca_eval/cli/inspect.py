"""``moca-eval inspect``: what a checkpoint is, as the loader sees it; or the known layouts."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    from moca_eval.cli import common

    p = sub.add_parser("inspect", help="show a checkpoint's detected layout, family and architecture, "
                       "or list the known layouts")
    common.add_backbone_args(p, ckpt_required=False, img_size=False)
    p.add_argument("path", type=Path, nargs="?", help="checkpoint to inspect (same as --ckpt; omit both "
                   "to list the layouts)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moca_eval.checkpoint_formats import FORMATS
    from moca_eval.cli import common

    ckpt = args.path or args.ckpt
    if ckpt is None:
        for fmt in FORMATS:
            print(f"{fmt.name:20s} families={','.join(fmt.families):17s} {fmt.description}")
        return 0
    bb = common.backbone_config(args, ckpt=ckpt, img_size=None).load()
    print(bb.summary())
    print(f"  sha256   {bb.sha256}")
    print(f"  family   {bb.family} ({bb.family_choice.reason})")
    print(f"  arch     {bb.arch}")
    if bb.dropped:
        shown = ", ".join(bb.dropped[:6]) + (" ..." if len(bb.dropped) > 6 else "")
        print(f"  dropped  {shown}")
    return 0
