"""``moca-eval knn``: weighted k-NN top-1/top-5 for every (k, T)."""

from __future__ import annotations

import argparse

from moca_eval.cli import common


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("knn", help="weighted k-NN classification on frozen features",
                       description="Weighted k-NN (DINO's protocol) with FAISS: one search at the "
                       "largest k, every (k, T) voted from it.")
    common.add_backbone_args(p)
    common.add_data_args(p)
    p.add_argument("--k", dest="ks", type=int, nargs="+", default=[10, 20, 100, 200],
                   help="numbers of neighbours (default: 10 20 100 200; the paper reports 20)")
    p.add_argument("--temperature", dest="temperatures", type=float, nargs="+", default=[0.07],
                   help="voting temperatures (default 0.07, DINO; MOCA's README reports 0.04)")
    p.add_argument("--feature", help="feature variant (default: the checkpoint family's: avg for "
                   "MOCA, cls for the others)")
    p.add_argument("--faiss-gpu", dest="use_gpu", action=argparse.BooleanOptionalAction,
                   default=None, help="force the FAISS GPU/CPU search (default: GPU when visible)")
    p.add_argument("--index-dtype", default="float32", choices=["float32", "float16"],
                   help="precision the normalised train features are searched in (float16: "
                   "half the memory; accuracy impact in BENCHMARKS.md)")
    common.add_runtime_args(p)
    common.add_output_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moca_eval.protocols import knn

    cfg = knn.KnnConfig(job=common.feature_job(args), ks=tuple(args.ks),
                        temperatures=tuple(args.temperatures), feature=args.feature,
                        use_gpu=args.use_gpu, index_dtype=args.index_dtype)
    result = knn.run(cfg)
    rows = [{"k": s.k, "T": s.temperature, "top1": s.top1, "top5": s.top5} for s in result.scores]
    ckpt = result.record.checkpoint
    title = (f"k-NN on {args.data} ({result.n_train} train / {result.n_val} val, feature "
             f"{result.feature}, layout {ckpt['layout']}, family {ckpt['family']})")
    common.emit(rows, ["k", "T", "top1", "top5"], result.to_dict(), args.output, title=title)
    return 0
