"""``moca-eval run``: a suite of checkpoints x protocols, from flags or a TOML/YAML suite file."""

from __future__ import annotations

import argparse
from pathlib import Path

from moca_eval.cli import common


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run checkpoints x protocols (a suite); reruns do only the missing cells",
        description="Run every (checkpoint, protocol) cell of a suite, one run directory and one "
        "record.json per cell under --output-dir. A rerun reuses finished cells with the same "
        "settings, resumes training cells and retries failed ones; a failing cell does not stop "
        "the others (exit 1 at the end). Features are extracted once per checkpoint and shared "
        "through the feature cache. Suite file format: README 'Suite files'; example: "
        "suites/paper.toml.")
    p.add_argument("suite", nargs="?", type=Path, help="suite file (.toml, .yaml); flags below override it")
    p.add_argument("--ckpt", nargs="+", help="checkpoints: files, hf-hub:ORG/NAME[@REV], timm:NAME")
    p.add_argument("--protocols", nargs="+", help="knn lowshot linear finetune seg det, or entries "
                   "of the suite file")
    p.add_argument("--data", type=Path, help="dataset root with train/ and val/")
    p.add_argument("--output-dir", type=Path, help="where the run directories go (default runs/<name>)")
    p.add_argument("--name", help="suite name (default: the file's, else 'suite')")
    p.add_argument("--limit", type=float, help="smoke run: N images per class, or a fraction 0<x<1")
    p.add_argument("--set", dest="assignments", nargs="+", default=[], metavar="TABLE.KEY=VALUE",
                   help="set a suite-file value (TOML syntax; a bare word is a string): knn.ks=[20] "
                   "linear.mode=cached backbone.img_size=448 runtime.batch_size=64")
    g = p.add_argument_group("runtime (override the suite file's [runtime])")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--batch-size", type=int, help="extraction batch per process (default: the suite's)")
    g.add_argument("--num-workers", type=int, help="image-decoding workers (default: the suite's)")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on GPU, fp32 on CPU (default: the suite's)")
    g.add_argument("--cache-dir", type=Path, help=f"feature cache (default {common.default_cache_dir()})")
    g.add_argument("--no-cache", action="store_true", help="no feature cache (every cell extracts)")
    p.add_argument("--no-progress", action="store_true", help="no live overview bar")
    p.set_defaults(func=run)


def raw_suite(args: argparse.Namespace):
    """The suite's raw keys (file, then flags) and the text used in error messages."""
    from moca_eval.suite_file import SuiteText, read_suite_file

    raw, source = read_suite_file(args.suite) if args.suite else ({}, SuiteText("command line"))
    flags = {"checkpoints": args.ckpt, "protocols": args.protocols, "name": args.name, "limit": args.limit,
             "data": str(args.data) if args.data else None,
             "output": str(args.output_dir) if args.output_dir else None}
    raw.update({k: v for k, v in flags.items() if v is not None})
    for text in args.assignments:
        table, key, value = parse_assignment(text)
        target = raw.setdefault(table, {}) if table in ("backbone", "runtime") else \
            raw.setdefault("protocol", {}).setdefault(table, {})
        target[key] = value
    runtime = dict(raw.get("runtime") or {})
    for key in ("device", "batch_size", "num_workers", "precision", "cache_dir"):
        if getattr(args, key) is not None:
            runtime[key] = str(getattr(args, key)) if key == "cache_dir" else getattr(args, key)
    runtime.setdefault("cache_dir", str(common.default_cache_dir()))
    if args.no_cache:
        runtime["cache_dir"] = None
    raw["runtime"] = runtime
    return raw, source


def parse_assignment(text: str) -> tuple[str, str, object]:
    """``TABLE.KEY=VALUE`` (VALUE in TOML syntax; a bare word is a string)."""
    import tomllib

    from moca_eval.errors import ConfigError

    name, sep, value = text.partition("=")
    table, dot, key = name.strip().partition(".")
    if not (sep and dot and table and key):
        raise ConfigError(f"--set {text}: expected TABLE.KEY=VALUE, e.g. knn.ks=[20]")
    try:
        return table, key.strip(), tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return table, key.strip(), value.strip()


def run(args: argparse.Namespace) -> int:
    from moca_eval import distributed
    from moca_eval.results import format_table
    from moca_eval.suite import run_suite
    from moca_eval.suite_file import build_suite

    suite = build_suite(*raw_suite(args))
    distributed.init_from_env(suite.extract.device)
    outcomes = run_suite(suite, progress=not args.no_progress and common.is_main_process())
    if not common.is_main_process():
        return 0
    rows = [{"checkpoint": o.cell.checkpoint.name, "entry": o.cell.entry.name, "status": o.status,
             "headline": _headline(o.record), "directory / error": o.error or str(o.cell.directory)}
            for o in outcomes]
    failed = [o for o in outcomes if o.status == "failed"]
    print(f"suite {suite.name}: {len(outcomes)} cells, {sum(o.status == 'done' for o in outcomes)} run, "
          f"{sum(o.status == 'reused' for o in outcomes)} reused, {len(failed)} failed")
    print(format_table(rows, ["checkpoint", "entry", "status", "headline", "directory / error"]))
    print(f"records under {suite.output}; compare them with `moca-eval report {suite.output} --out DIR`")
    return 1 if failed else 0


def _headline(record: dict | None) -> str:
    if not record:
        return ""
    head = record["metrics"]["headline"]
    return "" if head["value"] is None else f"{head['value']:.2f} ({head['name']})"
