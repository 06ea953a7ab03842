"""``moca-eval demo``: demo data -> MOCA pretraining -> k-NN of the teacher vs its random init.

A few minutes on 2 CPU cores. Rerunning with the same ``--out`` resumes (or reuses) the
pretraining run and the feature cache.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moca_eval.cli import common

VAL_PER_CLASS = 30  # 300 val images: a steadier top-1 than the demo-data default


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate demo data, pretrain a tiny MOCA on it, k-NN its teacher",
                       description=__doc__)
    p.add_argument("--output-dir", "--out", dest="out", type=Path, default=Path("demo"),
                   help="working directory (default: demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo images and pretraining (default 0)")
    p.add_argument("--epochs", type=int, help="pretraining epochs (default: the tiny preset's)")
    p.add_argument("--no-progress", action="store_true", help="no pretraining progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from moca_eval.demo import make_demo_data
    from moca_eval.features import ExtractConfig
    from moca_eval.pipeline import BackboneConfig, DataConfig, FeatureJob
    from moca_eval.pretrain import preset
    from moca_eval.pretrain import run as pretrain
    from moca_eval.pretrain.checkpoint import CHECKPOINT, save_teacher
    from moca_eval.pretrain.model import MOCA
    from moca_eval.protocols import knn

    data = args.out / "data"
    if not (data / "val").is_dir():
        make_demo_data(data, seed=args.seed, val_per_class=VAL_PER_CLASS)
    print(f"demo data: {data}")
    run_dir = args.out / "pretrain"
    cfg = preset("tiny", data_dir=str(data), output_dir=str(run_dir), epochs=args.epochs, seed=args.seed,
                 resume=(run_dir / CHECKPOINT).exists(), progress=not args.no_progress)
    torch.manual_seed(cfg.seed)  # the weights pretrain() starts from
    random_init = save_teacher(args.out / "random-init.pth", MOCA(cfg))
    print(f"pretraining MOCA ({cfg.epochs} epochs of the 'tiny' preset) in {run_dir}")
    trained = pretrain(cfg)

    extract = ExtractConfig(cache_dir=args.out / "cache")
    rows, payload = [], {"pretrain_dir": str(run_dir), "epochs": cfg.epochs}
    for name, ckpt in (("random init", random_init), ("MOCA teacher", trained.teacher)):
        backbone = BackboneConfig(ckpt, img_size=cfg.img_size, family="moca")
        job = FeatureJob(backbone, DataConfig(data), extract)
        result = knn.run(knn.KnnConfig(job=job, ks=(10, 20), temperatures=(0.07,)))
        payload[name.replace(" ", "_").lower()] = result.to_dict()
        rows += [{"checkpoint": name, "k": s.k, "T": s.temperature, "top1": s.top1, "top5": s.top5}
                 for s in result.scores]
    common.emit(rows, ["checkpoint", "k", "T", "top1", "top5"], payload, args.out / "knn.json",
                title=f"k-NN on the demo data (feature {result.feature}, chance = 10%)")
    return 0
