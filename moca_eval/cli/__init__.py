"""moca-eval: evaluate self-supervised ViT checkpoints (MOCA, DINO, iBOT, MAE, MSN, MoCo-v3,
DINOv2, timm) with the published protocols: k-NN, linear probe, low-shot, fine-tuning,
Cityscapes segmentation, COCO detection; and pretrain MOCA. Start with `moca-eval demo`.

(For developers: a thin command line. Each subcommand module parses, builds a config, calls
the library and prints; argparse namespaces never leave this package.)

Exit codes: 0 success, 1 runtime failure, 2 bad input (a one-line message, no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from moca_eval import __version__
from moca_eval.cli.common import check_args
from moca_eval.errors import MocaEvalError

# Subcommand modules under moca_eval.cli, in help order.
COMMANDS = (
    "demo", "knn", "extract", "inspect", "demo_data",
)
OPTIONAL_COMMANDS = ("lowshot", "splits", "plot", "linear", "finetune", "recipes", "pretrain", "seg", "det",
                     "run", "report")


def _command_modules() -> list:
    modules = [importlib.import_module(f"moca_eval.cli.{name}") for name in COMMANDS]
    for name in OPTIONAL_COMMANDS:
        try:
            modules.append(importlib.import_module(f"moca_eval.cli.{name}"))
        except ModuleNotFoundError as err:
            if err.name != f"moca_eval.cli.{name}":
                raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moca-eval", description=__doc__.split("\n\n")[0],
                                     epilog="`moca-eval COMMAND --help` describes a command.")
    parser.add_argument("--version", action="version", version=f"moca-eval {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _command_modules():
        module.add_parser(sub)
    return parser


def one_line(err: BaseException) -> str:
    """The message on one line; an error re-raised from a DataLoader worker (whose message is the
    worker's whole traceback) keeps only the original message."""
    text = str(err)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        kind, sep, message = last.partition(": ")
        text = message if sep and kind.replace(".", "").replace("_", "").isalnum() else last
    return " ".join(text.split())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        check_args(args)
        return int(args.func(args) or 0)
    except MocaEvalError as err:
        if args.debug:
            raise
        print(f"moca-eval: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moca-eval: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI is the one place that catches broadly
        if args.debug:
            raise
        print(f"moca-eval: failed: {type(err).__name__}: {err} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1
