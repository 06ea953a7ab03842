"""Benchmark the linear probe: the head grid's cost per step, and cached vs augmented epochs.

1. Per training step of the paper (augmented) mode, with images already in memory (the
   strictest measure: no JPEG decoding to hide behind): ONE frozen backbone forward (bf16
   autocast on GPU) + heads forward/backward + SGD step, for one head, the 45-lr grid on one
   feature (``cls+avg``) and the default 135-head grid (45 lrs x cls/avg/cls+avg). The backbone
   part is the same for all and timed once per step; each configuration's heads run right after
   it on the same features; ratios are against the one-head step of the same process.
2. Time per epoch of ``moca-eval linear`` in cached and augmented mode on the demo data
   (10 classes, 64 px, ViT-Tiny/8 as in ``moca-eval demo``), with the one-off feature
   extraction of cached mode reported separately.

Usage:
    .venv/bin/python bench/bench_linear.py --out bench/linear.md
    .venv/bin/python bench/bench_linear.py --arch vit_base --img-size 224 --batch 128  # a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moca_eval import runtime
from moca_eval.demo import make_demo_data, save_random_moca_checkpoint
from moca_eval.features import ExtractConfig, compute_features
from moca_eval.models import ARCHS, ArchSpec, build_vit, with_img_size
from moca_eval.pipeline import BackboneConfig, DataConfig, FeatureJob
from moca_eval.protocols import linear
from moca_eval.protocols.linear import LR_GRID
from moca_eval.protocols.linear_heads import GridSGD, HeadGrid, grid_loss

FEATURE_DIMS = {"cls": 1, "avg": 1, "cls+avg": 2}


def grid_step_times(arch: ArchSpec, *, batch: int, classes: int, steps: int, device: torch.device
                    ) -> tuple[float, dict[str, float]]:
    """Median seconds of the backbone forward, and of the heads' part of a step per configuration.

    A step is one backbone pass (all feature variants at once) plus the heads' forward, backward
    and SGD step; the backbone part does not depend on the heads, so it is timed once per step and
    each configuration's heads right after it on the same features.
    """
    torch.manual_seed(0)
    backbone = build_vit(arch).to(device).eval().requires_grad_(False)
    images = torch.randn(batch, 3, arch.img_size, arch.img_size, device=device)
    labels = torch.randint(0, classes, (batch,), device=device)
    configs = {"1 head": (("cls+avg",), (0.04,)), "45 heads (cls+avg)": (("cls+avg",), LR_GRID),
               "135 heads (3 features)": (("cls", "avg", "cls+avg"), LR_GRID)}
    runs = {}
    for name, (feats, lrs) in configs.items():
        grid = HeadGrid({f: FEATURE_DIMS[f] * arch.embed_dim for f in feats}, lrs, classes).to(device)
        runs[name] = (grid, GridSGD(grid.param_groups(batch / 256), lr=0.1, momentum=0.9))
    backbone_times: list[float] = []
    head_times: dict[str, list[float]] = {name: [] for name in runs}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for _ in range(steps + 1):  # the first step warms up
        tic = timer(device)
        with autocast:
            out = compute_features(backbone, images, list(FEATURE_DIMS))
        backbone_times.append(timer(device) - tic)
        for name, (grid, opt) in runs.items():
            tic = timer(device)
            grid_loss(grid(out), labels, batch).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            head_times[name].append(timer(device) - tic)
    return (statistics.median(backbone_times[1:]),
            {name: statistics.median(t[1:]) for name, t in head_times.items()})


def timer(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def epoch_times(workdir: Path, *, epochs: int, device: str) -> dict[str, float]:
    """Seconds per epoch of cached and augmented mode on the demo data, and the extraction."""
    data = make_demo_data(workdir / "data")
    arch = ArchSpec(embed_dim=192, depth=12, num_heads=3, patch_size=8, img_size=64)
    ckpt = save_random_moca_checkpoint(workdir / "ckpt.pth", arch=arch)
    job = FeatureJob(BackboneConfig(ckpt, img_size=64), DataConfig(data),
                     ExtractConfig(batch_size=128, num_workers=2, device=device, cache_dir=workdir / "cache"))
    out: dict[str, float] = {}
    tic = time.perf_counter()
    from moca_eval.pipeline import extract_splits

    extract_splits(job, linear.DEFAULT_FEATURES, job.backbone.load(), job.data.splits())
    out["cached: one-off feature extraction (train + val)"] = time.perf_counter() - tic
    recipe = linear.linear_recipe("moca", epochs=epochs, batch_size=64)
    for mode in ("cached", "augmented"):
        run_dir = workdir / mode
        linear.run(linear.LinearConfig(job, recipe, mode=mode, output_dir=run_dir, micro_batch=64))
        records = runtime.JsonlLog(run_dir / runtime.LOG_NAME).records()
        out[f"{mode}: seconds per epoch"] = statistics.median(r["time_s"] for r in records)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="vit_small", choices=list(ARCHS))
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32, help="images per step (per process)")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per mode for the epoch timing")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = with_img_size(ARCHS[args.arch], args.img_size)
    bb, heads = grid_step_times(arch, batch=args.batch, classes=args.classes, steps=args.steps, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        epochs = epoch_times(Path(tmp), epochs=args.epochs, device=device.type)
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {args.threads} threads)")
    base = bb + heads["1 head"]
    lines = [
        "## Linear probe (`bench/bench_linear.py`)", "",
        f"Device: {where}; torch {torch.__version__}.", "",
        f"Per training step, augmented mode: {args.arch} at {args.img_size} px, batch {args.batch}, "
        f"{args.classes} classes, images in memory (no decoding), median of {args.steps} steps:", "",
        f"Backbone forward (all feature variants, once per step): {bb:.4f} s.", "",
        "| heads | heads: s / step | step: s | step vs 1 head |", "| --- | --- | --- | --- |",
        *[f"| {name} | {t:.4f} | {bb + t:.4f} | {(bb + t) / base:.3f}x |" for name, t in heads.items()], "",
        f"Linear probe on the demo data (400 train / 100 val, 64 px, ViT-Tiny/8, 135 heads, batch 64, "
        f"median over {args.epochs} epochs):", "",
        "| what | seconds |", "| --- | --- |",
        *[f"| {name} | {t:.3f} |" for name, t in epochs.items()], "",
    ]
    text = "\n".join(lines)
    print(text)
    print(json.dumps({"backbone": bb, "heads": heads, "epochs": epochs}))
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
