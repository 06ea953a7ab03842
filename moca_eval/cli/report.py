"""``moca-eval report``: a comparison table (Markdown, CSV, LaTeX) and figures from result records."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report", help="compare result records: tables (md, csv, tex) and figures",
        description="One row per checkpoint, one column per headline metric (k-NN, low-shot "
        "mean +- std per setting, linear, fine-tune, Cityscapes mIoU per training size, COCO AP). "
        "Settings that differ within a column are flagged (†), --limit smoke runs marked (*).")
    p.add_argument("records", nargs="+", type=Path, help="record JSON files or directories (searched)")
    p.add_argument("--output-dir", "--out", dest="out", type=Path, required=True,
                   help="directory for table.md/.csv/.tex and the figures")
    p.add_argument("--published", action="store_true", help="add the paper's published rows")
    p.add_argument("--figure-format", default="png", choices=["png", "pdf"], help="figure file type")
    p.add_argument("--decimals", type=int, default=1, help="decimals in the md/tex tables (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moca_eval.reporting import write_report

    written = write_report(args.records, args.out, published=args.published,
                           figure_format=args.figure_format, decimals=args.decimals)
    print((args.out / "table.md").read_text())
    print("written: " + ", ".join(str(p) for p in written.values()))
    return 0
