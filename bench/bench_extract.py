"""Feature extraction: moca-eval's ``extract_features`` (fp32 and bf16 autocast) against a
straightforward reference loop (fp32, per-batch ``model(x)``, no DataLoader workers).

    python bench/bench_extract.py [--arch vit_small --per-class 20 --batch-size 64]

Same process, same images (the demo data at 224 px), same random ViT weights. Also reports
k-NN top-1 on the fp32 and bf16 features, which must agree within 0.5 points.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from moca_eval.checkpoints import load_backbone
from moca_eval.data import ImageDataset, collate_skip_bad, eval_transform, load_split
from moca_eval.demo import make_demo_data
from moca_eval.features import ExtractConfig, compute_features, extract_features
from moca_eval.models import ARCHS, build_vit
from moca_eval.protocols.knn import evaluate


def reference_loop(model, index, batch_size: int) -> tuple[np.ndarray, float]:
    """What one writes first: no workers, fp32, ``model(x)`` per batch."""
    loader = DataLoader(ImageDataset(index, eval_transform(224)), batch_size=batch_size,
                        num_workers=0, collate_fn=collate_skip_bad)
    start = time.perf_counter()
    out = []
    with torch.no_grad():
        for images, _rows, _bad in loader:
            out.append(model(images))
    return torch.cat(out).numpy(), time.perf_counter() - start


def model_only(model, batch: int, repeats: int = 3) -> None:
    """The backbone alone on random images: fp32, bf16 autocast, a bf16 copy (best of ``repeats``)."""
    x = torch.randn(batch, 3, 224, 224)
    cast = copy.deepcopy(model).to(torch.bfloat16)

    def autocast():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return compute_features(model, x, ["cls"])

    runs = {"fp32": lambda: compute_features(model, x, ["cls"]), "bf16 autocast": autocast,
            "bf16 copy": lambda: compute_features(cast, x.to(torch.bfloat16), ["cls"])}
    best = {name: float("inf") for name in runs}
    with torch.inference_mode():
        ref = runs["fp32"]()["cls"]
        for _ in range(repeats):
            for name, fn in runs.items():
                start = time.perf_counter()
                out = fn()["cls"]
                best[name] = min(best[name], time.perf_counter() - start)
                cos = torch.nn.functional.cosine_similarity(out.float(), ref).min().item()
                best[name + " cos"] = cos
    for name in runs:
        print(f"| model only, {batch} images | {name} | {best[name]:.3f} s | "
              f"**{best['fp32'] / best[name]:.2f}x** | min cosine {best[name + ' cos']:.5f} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp())
    data = make_demo_data(tmp / "data", train_per_class=args.per_class, val_per_class=args.per_class // 2)
    torch.manual_seed(0)
    torch.save(build_vit(ARCHS[args.arch]).state_dict(), tmp / "vit.pth")
    backbone = load_backbone(tmp / "vit.pth")
    train, val = load_split(data, "train"), load_split(data, "val")
    n = len(train) + len(val)

    ref_train, t_ref_train = reference_loop(backbone.model, train, args.batch_size)
    _, t_ref_val = reference_loop(backbone.model, val, args.batch_size)
    t_ref = t_ref_train + t_ref_val
    rows, feats = [], {}
    for precision in ("fp32", "bf16"):
        cfg = ExtractConfig(batch_size=args.batch_size, precision=precision, cache_dir=None)
        start = time.perf_counter()
        feats[precision] = [extract_features(backbone, split, ["cls"], cfg) for split in (train, val)]
        elapsed = time.perf_counter() - start
        rows.append((precision, elapsed))
    assert np.abs(feats["fp32"][0].features["cls"] - ref_train).max() < 1e-4
    top1 = {}
    for precision, (tr, va) in feats.items():
        top1[precision] = evaluate(tr.features["cls"], tr.labels, va.features["cls"], va.labels, ks=[20],
                                   temperatures=[0.07], num_classes=10)[0].top1
    x = torch.nn.functional.normalize(torch.from_numpy(feats["fp32"][1].features["cls"]), dim=1)
    y = torch.nn.functional.normalize(torch.from_numpy(feats["bf16"][1].features["cls"]), dim=1)
    cosine = (x * y).sum(1).min().item()
    print(f"| {args.arch}/16 @224, {n} images, batch {args.batch_size}, {torch.get_num_threads()} threads "
          f"| reference fp32 loop {n / t_ref:.1f} img/s |")
    for precision, elapsed in rows:
        print(f"| moca-eval {precision} | {n / elapsed:.1f} img/s | **{t_ref / elapsed:.2f}x** | "
              f"k-NN top-1 {top1[precision]:.1f} |")
    print(f"| bf16 vs fp32 | min cosine {cosine:.5f} | top-1 difference "
          f"{abs(top1['bf16'] - top1['fp32']):.1f} points |")
    model_only(backbone.model, 32)


if __name__ == "__main__":
    main()
