"""``moca-eval demo``: demo data -> a checkpoint -> k-NN table, in a few minutes on a CPU."""

from __future__ import annotations

import argparse
from pathlib import Path

from moca_eval.cli import common


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate demo data, make a checkpoint, run k-NN on it")
    p.add_argument("--out", type=Path, default=Path("demo"), help="working directory (default: demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moca_eval.demo import make_demo_data, save_random_moca_checkpoint
    from moca_eval.features import ExtractConfig
    from moca_eval.models import ArchSpec
    from moca_eval.pipeline import BackboneConfig, DataConfig, FeatureJob
    from moca_eval.protocols import knn

    data = args.out / "data"
    if not (data / "val").is_dir():
        make_demo_data(data, seed=args.seed)
    print(f"demo data: {data}")
    arch = ArchSpec(embed_dim=192, depth=12, num_heads=3, patch_size=8, img_size=64)
    ckpt = save_random_moca_checkpoint(args.out / "checkpoint-random.pth", arch=arch, seed=args.seed)
    print(f"checkpoint: {ckpt} (a RANDOMLY initialised ViT-Tiny/8 in MOCA's checkpoint format)")
    job = FeatureJob(BackboneConfig(ckpt, img_size=64), DataConfig(data),
                     ExtractConfig(cache_dir=args.out / "cache"))
    result = knn.run(knn.KnnConfig(job=job, ks=(10, 20), temperatures=(0.07,)))
    rows = [{"k": s.k, "T": s.temperature, "top1": s.top1, "top5": s.top5} for s in result.scores]
    common.emit(rows, ["k", "T", "top1", "top5"], result.to_dict(), args.out / "knn.json",
                title=f"k-NN on the demo data (feature {result.feature}, chance = 10%)")
    return 0
