"""``moca-eval splits make|verify|stats``: low-shot split files for any ImageFolder dataset."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("splits", help="make, verify or summarise low-shot split files",
                       description="Low-shot split files in the MSN/MOCA format "
                       "(imagenet_subsets{k}/{n}imgs_class.txt, {p}percent.txt).")
    actions = p.add_subparsers(dest="splits_action", required=True, metavar="ACTION")

    m = actions.add_parser("make", help="generate nested, stratified splits from a seed")
    m.add_argument("--data", type=Path, required=True, help="dataset root with train/")
    m.add_argument("--train-split", default="train", help="training folder under --data (default train)")
    m.add_argument("--shots", type=int, nargs="*", default=[1, 2, 5], help="images per class (default 1 2 5)")
    m.add_argument("--percent", type=float, nargs="*", default=[1.0], help="percent per class (default 1)")
    m.add_argument("--splits", type=int, default=3, help="split files per setting (default 3)")
    m.add_argument("--seed", type=int, default=0, help="seed of the image draws (default 0)")
    m.add_argument("--allow-short", action="store_true",
                   help="a class with fewer images than a shot count gives all it has")
    m.add_argument("--output-dir", "--out", dest="out", type=Path, required=True,
                   help="new (or empty) output directory")
    m.set_defaults(func=run_make, dir_outputs={"out": "--output-dir"})

    v = actions.add_parser("verify", help="check a generated directory against its manifest")
    v.add_argument("split_dir", type=Path)
    v.add_argument("--data", type=Path, help="also check every image exists in DATA/train")
    v.add_argument("--train-split", default="train", help="training folder under --data (default train)")
    v.set_defaults(func=run_verify)

    s = actions.add_parser("stats", help="per-class counts and overlaps between splits")
    s.add_argument("split_dir", type=Path)
    s.add_argument("--data", type=Path, help="dataset (class list; checks the names exist)")
    s.add_argument("--train-split", default="train", help="training folder under --data (default train)")
    s.add_argument("--per-class", action="store_true", help="print every class's counts")
    s.set_defaults(func=run_stats)


def _dataset(data: Path, train_split: str):
    from moca_eval.data import load_split
    from moca_eval.protocols.splits import DatasetKeys

    return DatasetKeys.from_index(load_split(data, train_split))


def run_make(args: argparse.Namespace) -> int:
    from moca_eval.protocols.splits import Setting, make_split_files
    from moca_eval.protocols.splits_dir import build_manifest, write_split_dir

    settings = [Setting(shots=n) for n in args.shots] + [Setting(percent=p) for p in args.percent]
    if not settings or args.splits < 1:
        from moca_eval.errors import ConfigError

        raise ConfigError("give at least one --shots or --percent value and --splits >= 1")
    data = _dataset(args.data, args.train_split)
    files = make_split_files(data, settings, args.splits, seed=args.seed,
                             allow_short=args.allow_short)
    manifest = build_manifest(files, data, seed=args.seed, settings=settings,
                              n_splits=args.splits, allow_short=args.allow_short)
    write_split_dir(args.out, files, manifest)
    short = sum(len(sf.short) for sf in files)
    print(f"wrote {len(files)} split files and manifest.json to {args.out}"
          + (f" ({short} short class entries, see the manifest)" if short else ""))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from moca_eval.errors import DatasetError
    from moca_eval.protocols.splits_dir import verify_split_dir

    data = _dataset(args.data, args.train_split) if args.data else None
    problems = verify_split_dir(args.split_dir, data)
    if problems:
        for line in problems[1:]:
            print(line)
        raise DatasetError(f"{len(problems)} problem(s) in {args.split_dir}: {problems[0]}")
    print(f"{args.split_dir}: every file matches its manifest"
          + (f" and every image exists in {args.data}" if data else ""))
    return 0


def run_stats(args: argparse.Namespace) -> int:
    from moca_eval.protocols.splits import check_split_file, class_of
    from moca_eval.protocols.splits_dir import discover_split_files, split_stats
    from moca_eval.results import format_table

    files = discover_split_files(args.split_dir)
    if args.data:
        data = _dataset(args.data, args.train_split)
        files = [check_split_file(sf, data, allow_short=True) for sf in files]
        classes = list(data.classes)
    else:
        classes = sorted({class_of(k) for sf in files for k in sf.keys})
    summary, overlaps, per_class = split_stats(files, classes)
    print(f"split files in {args.split_dir} ({len(classes)} classes)")
    print(format_table(summary, ["file", "setting", "split", "images", "classes", "min/class",
                                 "max/class"]))
    if overlaps:
        print("\nimages shared between splits of a setting")
        print(format_table(overlaps, ["setting", "splits", "shared", "shared %"]))
    if args.per_class:
        print("\nimages per class")
        print(format_table(per_class, ["class", *[sf.relpath for sf in files]]))
    return 0
