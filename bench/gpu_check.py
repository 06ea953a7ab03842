"""Run every GPU code path of moca-eval once and write one JSON of measurements.

Sections (each independent: one failing is recorded as an error, the others still run):
- ``extract``: ViT-B/16 at 224 px, images/s in fp32 and bf16 through ``extract_features``
  (its DataLoader) on synthetic JPEGs of ImageNet size (500 x 375);
- ``faiss``: the k-NN search (``protocols.knn.search``: FAISS-GPU shards) of 1.28M x 768
  train features vs 50k queries at k = 200, float32 and float16 index: time, device memory;
- ``lowshot``: the torch L-BFGS solver at 1000 classes x 5 shots, 768-d;
- ``pretrain``: one MOCA ViT-B step with full and with partial decoding (peak memory, the
  direction of the paper's Table 1), and MOCA's two-round step;
- ``seg``, ``det``: one training run of one iteration (mmseg Segmenter, mmdet Cascade Mask
  R-CNN) on synthetic data; skipped, with the reason, when mmseg / mmdet cannot be imported.

    python bench/gpu_check.py --out gpu_check.json            # a GPU machine, under 8 minutes
    python bench/gpu_check.py --tiny --device cpu --out x.json # tiny sizes on CPU (CI)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_pretrain

SECTIONS = ("extract", "faiss", "lowshot", "pretrain", "seg", "det")
FULL = {"extract_images": 1024, "extract_batch": 128, "image_size": (500, 375), "arch": "vit_base",
        "faiss_train": 1_281_167, "faiss_query": 50_000, "dim": 768, "k": 200,
        "lowshot_classes": 1000, "lowshot_shots": 5, "pretrain": "vit_base", "pretrain_batch": 32}
TINY = {"extract_images": 12, "extract_batch": 4, "image_size": (80, 60), "arch": "tiny",
        "faiss_train": 3000, "faiss_query": 100, "dim": 32, "k": 20,
        "lowshot_classes": 20, "lowshot_shots": 5, "pretrain": "tiny", "pretrain_batch": 16}
TINY_ARCH = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 16, "img_size": 32}


class DeviceMemory:
    """Peak device memory in use (all allocators, FAISS's included), sampled every 20 ms."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self) -> DeviceMemory:
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            self.base, self.total = total - free, total
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            free, _ = torch.cuda.mem_get_info(self.device)
            self.peak = max(self.peak, self.total - free - self.base)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self._stop.set()
            self._thread.join()

    @property
    def peak_mib(self) -> float | None:
        return self.peak / 2**20 if self.device.type == "cuda" else None


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_jpegs(root: Path, n: int, size: tuple[int, int], classes: int = 4) -> Path:
    """``n`` smooth random JPEGs (photo-like file sizes) in an ImageFolder tree ``root/train``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "train" / f"n{i % classes:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, (size[1] // 25 + 1, size[0] // 25 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize(size, Image.BILINEAR)
        noisy = np.asarray(img, np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.JPEG", quality=90)
    return root


def random_checkpoint(path: Path, arch_name: str) -> Path:
    from moca_eval.demo import save_random_moca_checkpoint
    from moca_eval.models import ARCHS, ArchSpec

    arch = ArchSpec(**TINY_ARCH) if arch_name == "tiny" else ARCHS[arch_name]
    return save_random_moca_checkpoint(path, arch=arch)


def check_extract(sizes: dict, device: torch.device, work: Path) -> dict:
    from moca_eval.checkpoints import load_backbone
    from moca_eval.data import load_split
    from moca_eval.features import ExtractConfig, extract_features

    data = write_jpegs(work / "jpegs", sizes["extract_images"], sizes["image_size"])
    backbone = load_backbone(random_checkpoint(work / "extract.pth", sizes["arch"]))
    index = load_split(data, "train")
    workers = 0 if device.type == "cpu" else min(16, os.cpu_count() or 1)
    out: dict = {"images": len(index), "arch": backbone.arch.describe(), "num_workers": workers}
    feats = {}
    for precision in ("fp32", "bf16"):
        cfg = ExtractConfig(batch_size=sizes["extract_batch"], num_workers=workers,
                            device=str(device), precision=precision, cache_dir=None)
        extract_features(backbone, index, ["cls"], cfg)  # warm-up (cuDNN, workers, pages)
        _sync(device)
        start = time.perf_counter()
        feats[precision] = extract_features(backbone, index, ["cls"], cfg).features["cls"]
        _sync(device)
        out[f"{precision}_images_per_s"] = len(index) / (time.perf_counter() - start)
    a, b = (torch.nn.functional.normalize(torch.from_numpy(feats[p]).float(), dim=1)
            for p in ("fp32", "bf16"))
    out["bf16_min_cosine_to_fp32"] = float((a * b).sum(1).min())
    return out


def check_faiss(sizes: dict, device: torch.device, work: Path) -> dict:
    from moca_eval.protocols.knn import l2_normalize, search, to_index_dtype

    rng = np.random.default_rng(0)
    n, q, d, k = sizes["faiss_train"], sizes["faiss_query"], sizes["dim"], sizes["k"]
    train = l2_normalize(rng.standard_normal((n, d), dtype=np.float32), inplace=True)
    query = l2_normalize(rng.standard_normal((q, d), dtype=np.float32), inplace=True)
    out: dict = {"train": n, "queries": q, "dim": d, "k": k, "gpu": device.type == "cuda"}
    ids = {}
    for dtype in ("float32", "float16"):
        index = to_index_dtype(train, dtype)
        with DeviceMemory(device) as mem:
            start = time.perf_counter()
            _, ids[dtype] = search(index, query, k, use_gpu=device.type == "cuda")
            out[f"{dtype}_seconds"] = time.perf_counter() - start
        out[f"{dtype}_device_peak_MiB"] = mem.peak_mib
        del index
    out["float16_top1_neighbour_agreement"] = float(np.mean(ids["float16"][:, 0] == ids["float32"][:, 0]))
    out["train_MiB"] = train.nbytes / 2**20
    out["host_peak_rss_MiB"] = peak_rss_mib()
    return out


def check_lowshot(sizes: dict, device: torch.device, work: Path) -> dict:
    from moca_eval.protocols.lowshot_logreg import fit_logreg, preprocess_features

    rng = np.random.default_rng(0)
    classes, shots, d = sizes["lowshot_classes"], sizes["lowshot_shots"], sizes["dim"]
    y = np.repeat(np.arange(classes), shots)
    centres = rng.standard_normal((classes, d)).astype(np.float32)
    x = preprocess_features(3.0 + 0.25 * centres[y] + rng.standard_normal((len(y), d), dtype=np.float32))
    out: dict = {"classes": classes, "shots": shots, "dim": d}
    for lambd in (0.1, 2.5e-4):
        _sync(device)
        start = time.perf_counter()
        model = fit_logreg(x, y, lambd=lambd, solver="torch", device=str(device))
        _sync(device)
        out[f"lambda_{lambd:g}"] = {"seconds": time.perf_counter() - start, "passes": model.n_iter,
                                    "objective": model.objective, "gap": model.gap,
                                    "converged": model.converged,
                                    "train_top1": float(np.mean(model.predict(x) == y) * 100)}
    return out


def check_pretrain(sizes: dict, device: torch.device, work: Path) -> dict:
    from bench_pretrain import measure

    from moca_eval.pretrain.config import preset

    base = preset(sizes["pretrain"], batch_size=sizes["pretrain_batch"])
    results = measure(base, device, batch=sizes["pretrain_batch"], warmup=1 if device.type == "cuda"
                      else 0, repeats=2 if device.type == "cuda" else 1)
    key = "peak_MiB" if device.type == "cuda" else "saved_MiB"
    full, partial = results["1 round, full decoding"], results["1 round, partial decoding"]
    return {"config": sizes["pretrain"], "images_per_view": sizes["pretrain_batch"],
            "variants": results, "memory_measure": key,
            "partial_decoding_saves_memory": partial[key] < full[key],
            "partial_over_full_memory": partial[key] / full[key]}


def _stack_missing(module: str) -> str | None:
    try:
        __import__(module)
    except Exception as err:  # ImportError, or mmcv's own errors at import
        return f"{module} not importable ({type(err).__name__}: {err})"
    return None


def check_seg(sizes: dict, device: torch.device, work: Path) -> dict:
    return _mm_section("mmseg", device, lambda: _seg_run(sizes, work))


def _seg_run(sizes: dict, work: Path) -> Callable[[], object]:
    from moca_eval.segmentation import cityscapes as cs
    from moca_eval.segmentation.run import SegConfig, run

    tiny = sizes["arch"] == "tiny"
    data = cs.make_synthetic_cityscapes(work / "cityscapes", n_train=2, n_val=1,
                                        size=(128, 256) if tiny else (1024, 2048))
    cfg = SegConfig(backbone=random_checkpoint(work / "seg.pth", sizes["arch"]), data=data,
                    mode="finetune", train_size="full", iters=1, batch_size=2,
                    crop_size=64 if tiny else 768, stride=48 if tiny else 512,
                    resize_scale=(256, 128) if tiny else (2048, 1024), num_workers=0,
                    work_dir=work / "seg-run")
    return lambda: run(cfg)


TINY_DETECTOR = {  # shrinks the Cascade Mask R-CNN heads for the CPU run (as the tests do)
    "model.neck.out_channels": 32, "model.rpn_head.in_channels": 32,
    "model.rpn_head.feat_channels": 32, "model.roi_head.bbox_roi_extractor.out_channels": 32,
    "model.roi_head.mask_roi_extractor.out_channels": 32, "model.roi_head.mask_head.in_channels": 32,
    "model.roi_head.mask_head.conv_out_channels": 32,
    **{f"model.roi_head.bbox_head.{i}.{k}": v for i in range(3)
       for k, v in (("in_channels", 32), ("conv_out_channels", 32), ("fc_out_channels", 64))},
}


def check_det(sizes: dict, device: torch.device, work: Path) -> dict:
    return _mm_section("mmdet", device, lambda: _det_run(sizes, work))


def _det_run(sizes: dict, work: Path) -> Callable[[], object]:
    from moca_eval.detection import coco
    from moca_eval.detection.run import DetConfig, run

    tiny = sizes["arch"] == "tiny"
    data = coco.make_synthetic_coco(work / "coco", n_train=2, n_val=1,
                                    size=(160, 256) if tiny else (480, 640))
    extra = dict(train_short_sides=(64,), test_short_side=96, max_long_side=160,
                 cfg_options=TINY_DETECTOR) if tiny else {}
    cfg = DetConfig(backbone=random_checkpoint(work / "det.pth", sizes["arch"]), data=data, epochs=1,
                    batch_size=2, per_gpu_batch=2, warmup_iters=0, num_workers=0, num_preview=0,
                    work_dir=work / "det-run", **extra)
    return lambda: run(cfg)


def _mm_section(module: str, device: torch.device, build: Callable[[], Callable[[], object]]) -> dict:
    """Skipped (with the import error) when ``module`` cannot be imported, else the timed run."""
    missing = _stack_missing(module)
    if missing:
        return {"status": "skipped", "reason": missing}
    fn = build()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    out = {"seconds_train_and_eval": time.perf_counter() - start}
    if device.type == "cuda":
        out["peak_allocated_MiB"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


CHECKS = {"extract": check_extract, "faiss": check_faiss, "lowshot": check_lowshot,
          "pretrain": check_pretrain, "seg": check_seg, "det": check_det}


def run_checks(names: list[str], *, tiny: bool, device: torch.device) -> dict:
    sizes = TINY if tiny else FULL
    report: dict = {"meta": meta(device, tiny), "sections": {}}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        for name in names:
            start = time.perf_counter()
            try:
                result = CHECKS[name](sizes, device, Path(tmp) / name)
                result = {"status": "ok", **result} if "status" not in result else result
            except Exception as err:  # a report of what failed, the other sections still run
                result = {"status": "error", "error": f"{type(err).__name__}: {err}",
                          "traceback": traceback.format_exc(limit=6)}
            result["seconds"] = time.perf_counter() - start
            report["sections"][name] = result
            print(f"{name}: {result['status']} ({result['seconds']:.1f} s)", flush=True)
    report["meta"]["total_seconds"] = sum(s["seconds"] for s in report["sections"].values())
    return report


def meta(device: torch.device, tiny: bool) -> dict:
    import faiss

    return {"tiny": tiny, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine(),
            "faiss_gpus": faiss.get_num_gpus(), "torch": torch.__version__,
            "faiss": faiss.__version__, "cpus": os.cpu_count(),
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON report path")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny sizes (seconds on CPU)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    args = p.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    report = run_checks(args.only, tiny=args.tiny, device=device)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=_jsonable))
    os.replace(tmp, args.out)
    return 1 if any(s["status"] == "error" for s in report["sections"].values()) else 0


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
