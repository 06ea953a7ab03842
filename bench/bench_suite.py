"""Suite overhead: ``run_suite`` (one checkpoint x k-NN, low-shot, cached linear) against the same
three protocols run one by one, and against one extraction pass of every feature they read;
the suite rerun on a warm cache (into a new output directory) measures the protocols' own work.

    python bench/bench_suite.py [--per-class 40 --depth 12 --width 192]

Same process, same images (demo data at 224 px), same random MOCA-layout ViT. One by one is
timed twice: without a feature cache (each protocol extracts what it reads) and with one shared
cache (the CLI's default). The suite starts from an empty cache. Eval transform: bicubic for
every protocol (the suite's ``interpolation``), so all features come from one transform.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from moca_eval.demo import make_demo_data, save_random_moca_checkpoint
from moca_eval.features import ExtractConfig
from moca_eval.models import ArchSpec
from moca_eval.pipeline import BackboneConfig, DataConfig, FeatureJob, extract_splits
from moca_eval.sources import resolve
from moca_eval.suite import PROTOCOLS, CheckpointEntry, Entry, Suite, build_config, run_protocol, run_suite

ENTRIES = (Entry("knn", "knn", {"ks": [20]}),
           Entry("lowshot", "lowshot", {"shots": [1, 2, 5], "solver": "torch"}),
           Entry("linear", "linear", {"mode": "cached", "epochs": 10, "batch_size": 64,
                                      "lr_grid": [0.1, 1.0]}))


def one_by_one(ckpt: Path, data: DataConfig, extract: ExtractConfig, tmp: Path) -> float:
    """Each protocol as its own command would run it (lowshot extracts its split images only)."""
    start = time.perf_counter()
    for i, entry in enumerate(ENTRIES):
        settings = {k: v for k, v in entry.settings.items()}
        cfg = build_config(PROTOCOLS[entry.protocol], settings, backbone=BackboneConfig(ckpt, img_size=224),
                           data=data, extract=extract, run_dir=tmp / f"alone-{extract.cache_dir is None}-{i}")
        if entry.protocol == "lowshot":
            cfg = replace(cfg, train_features="splits")
        run_protocol(PROTOCOLS[entry.protocol], cfg, resolve(ckpt))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=40, help="train images per class (10 classes)")
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        root = make_demo_data(tmp / "data", train_per_class=args.per_class, val_per_class=10, image_size=256)
        arch = ArchSpec(embed_dim=args.width, depth=args.depth, num_heads=args.width // 64, patch_size=16,
                        img_size=224)
        ckpt = save_random_moca_checkpoint(tmp / "moca.pth", arch=arch)
        data = DataConfig(root, interpolation="bicubic")
        extract = ExtractConfig(batch_size=args.batch_size, num_workers=2, device="cpu", precision="fp32")

        backbone = BackboneConfig(ckpt, img_size=224).load()
        start = time.perf_counter()
        extract_splits(FeatureJob(None, data, extract), ["avg", "avg-prenorm", "cls", "cls+avg"], backbone,
                       data.splits())
        one_pass = time.perf_counter() - start

        alone = one_by_one(ckpt, data, extract, tmp)
        alone_cached = one_by_one(ckpt, data, replace(extract, cache_dir=tmp / "cache-alone"), tmp)
        suite = Suite([CheckpointEntry(resolve(ckpt), {"img_size": 224})], list(ENTRIES), data,
                      replace(extract, cache_dir=tmp / "cache-suite"), tmp / "suite", "bench")
        start = time.perf_counter()
        outcomes = run_suite(suite, progress=False)
        in_suite = time.perf_counter() - start
        assert all(o.status == "done" for o in outcomes), [o.error for o in outcomes]
        start = time.perf_counter()  # the same cells again on the warm cache: protocol work only
        run_suite(replace(suite, output=tmp / "suite-again"), progress=False)
        compute = time.perf_counter() - start

    n = 10 * (args.per_class + 10)
    print(f"{n} images, ViT width {args.width} depth {args.depth}, 224 px, CPU fp32, "
          f"{torch.get_num_threads()} threads")
    print(f"one extraction pass (all 4 features):   {one_pass:7.1f} s  (1.00)")
    print(f"one by one, no cache:                   {alone:7.1f} s  ({alone / one_pass:.2f})")
    print(f"one by one, shared cache (CLI default): {alone_cached:7.1f} s  ({alone_cached / one_pass:.2f})")
    print(f"suite (pre-extraction + cache):         {in_suite:7.1f} s  ({in_suite / one_pass:.2f})")
    print(f"suite on a warm cache (protocol work):  {compute:7.1f} s  ({compute / one_pass:.2f})")
    print(f"suite minus protocol work:              {in_suite - compute:7.1f} s  "
          f"({(in_suite - compute) / one_pass:.2f})")
    print(f"suite / one by one (no cache): {in_suite / alone:.2f}; "
          f"suite / one by one (shared cache): {in_suite / alone_cached:.2f}")


if __name__ == "__main__":
    main()
