"""``moca-eval plot``: accuracy vs images per class from low-shot result files."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot low-shot results (one curve per result file)",
                       description="Top-1 vs labelled images per class (mean line, +-std band "
                       "over splits), one curve per `moca-eval lowshot --output` file.")
    p.add_argument("results", type=Path, nargs="+", help="low-shot result JSON files")
    p.add_argument("--output", "--out", dest="out", type=Path, required=True,
                   help="figure to write: .png, .pdf or .svg")
    p.add_argument("--labels", nargs="+", help="curve names (default: checkpoint file stems)")
    p.add_argument("--title", default="Low-shot logistic regression", help="figure title")
    p.set_defaults(func=run, file_outputs={"out": "--output"})


def run(args: argparse.Namespace) -> int:
    from moca_eval.errors import ConfigError
    from moca_eval.protocols.lowshot_plot import default_label, figure_format, load_lowshot_json, plot_lowshot

    figure_format(args.out)  # before reading anything
    results = [load_lowshot_json(path) for path in args.results]
    if args.labels and len(args.labels) != len(results):
        raise ConfigError(f"--labels gives {len(args.labels)} names for {len(results)} files")
    labels = args.labels or [default_label(r, p) for r, p in zip(results, args.results)]
    plot_lowshot(results, labels, args.out, title=args.title)
    print(f"plot written to {args.out}")
    return 0
