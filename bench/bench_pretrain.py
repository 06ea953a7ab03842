"""Benchmark a MOCA training step: partial decoding and the second masking round (paper Table 1).

Three variants of the same step (EMA update, teacher targets, student, decoder, losses,
backward, gradient clipping, AdamW step: ``train.train_step``'s order) on random images,
built from one preset:
- ``1 round, full decoding``: mask 55%, the decoder predicts every token;
- ``1 round, partial decoding``: the decoder predicts the visible tokens + 20% of all tokens;
- ``2 rounds, partial decoding``: MOCA's default (55% then 75%, targets re-used).
Time: median over ``--repeats`` steps, the variants interleaved so that machine load hits them
alike (after ``--warmup`` steps each). Memory: bytes of the tensors autograd saves for the
backward pass (distinct storages; the activation memory, device independent), and on CUDA
also the peak allocated memory. Ratios are against the partial-decoding 1-round step.

Usage:
    .venv/bin/python bench/bench_pretrain.py --config vit_base --batch-size 8 --out bench/pretrain.md
    .venv/bin/python bench/bench_pretrain.py --config tiny  # quick
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from dataclasses import replace

import torch

from moca_eval.distributed import DistInfo
from moca_eval.pretrain.config import PRESETS, PretrainConfig, preset
from moca_eval.pretrain.model import MOCA
from moca_eval.pretrain.train import build_optimizer, step_generator
from moca_eval.runtime import Runtime, backward, optimizer_step, resolve_precision

VARIANTS = {
    "1 round, full decoding": dict(mask_ratios=(0.55,), partial_decoding=None),
    "1 round, partial decoding": dict(mask_ratios=(0.55,), partial_decoding=0.2),
    "2 rounds, partial decoding (MOCA)": dict(mask_ratios=(0.55, 0.75), partial_decoding=0.2),
}
REFERENCE = "1 round, partial decoding"


class SavedBytes:
    """Counts the bytes of distinct storages autograd saves for backward."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


class Variant:
    """A MOCA model, its optimizer and fixed random inputs for one configuration."""

    def __init__(self, cfg: PretrainConfig, device: torch.device, batch: int) -> None:
        torch.manual_seed(0)
        self.cfg = cfg
        self.device = device
        self.model = MOCA(cfg).to(device)
        self.optimizer = build_optimizer(self.model, cfg)
        self.rt = Runtime(device, resolve_precision(cfg.precision, device), DistInfo())
        self.scaler = self.rt.grad_scaler()
        shape = (batch, 3, cfg.img_size, cfg.img_size)
        self.x1, self.x2 = torch.randn(shape, device=device), torch.randn(shape, device=device)
        self.steps = 0

    def step(self, *, count_saved: bool = False) -> float:
        """One training step; returns its wall time (or the saved bytes when counting)."""
        saved = SavedBytes()
        hooks = (torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t) if count_saved
                 else torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t))
        self._sync()
        start = time.perf_counter()
        self.model.update_teacher(self.cfg.momentum)
        with hooks, self.rt.autocast():
            out = self.model(self.x1, self.x2, generator=step_generator(0, self.steps))
        self.optimizer.zero_grad(set_to_none=True)
        backward(out.loss, self.scaler)
        optimizer_step(self.model, self.optimizer, clip_grad=self.cfg.clip_grad, scaler=self.scaler)
        self._sync()
        self.steps += 1
        return float(saved.total) if count_saved else time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def peak_cuda_bytes(variant: Variant) -> float:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(variant.device)
    variant.step()
    return float(torch.cuda.max_memory_allocated(variant.device))


def measure(base: PretrainConfig, device: torch.device, *, batch: int, warmup: int,
            repeats: int) -> dict[str, dict[str, float]]:
    variants = {name: Variant(replace(base, **over), device, batch) for name, over in VARIANTS.items()}
    results: dict[str, dict[str, float]] = {}
    for name, variant in variants.items():
        results[name] = {"saved_MiB": variant.step(count_saved=True) / 2**20}
        if device.type == "cuda":
            results[name]["peak_MiB"] = peak_cuda_bytes(variant) / 2**20
        for _ in range(warmup):
            variant.step()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, variant in variants.items():
            times[name].append(variant.step())
    for name in variants:
        results[name]["step_s"] = statistics.median(times[name])
    return results


def to_markdown(results: dict[str, dict[str, float]], *, header: str) -> str:
    ref = results[REFERENCE]
    keys = [k for k in ("step_s", "saved_MiB", "peak_MiB") if k in ref]
    cols = " | ".join(f"{k} | x ref" for k in keys)
    lines = [header, "", f"| variant | {cols} |", "|---" * (1 + 2 * len(keys)) + "|"]
    for name, row in results.items():
        cells = " | ".join(f"{row[k]:.3f} | {row[k] / ref[k]:.2f}" for k in keys)
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="vit_base", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=8, help="images per view")
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", help="write the markdown table here")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    base = preset(args.config, batch_size=args.batch_size)
    results = measure(base, device, batch=args.batch_size, warmup=args.warmup, repeats=args.repeats)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
    header = (f"MOCA step, `{args.config}` ({base.arch}/{base.patch_size} at {base.img_size} px), "
              f"{args.batch_size} images x 2 views, {where}, torch {torch.__version__}, "
              f"median of {args.repeats} interleaved steps; x ref = ratio to '{REFERENCE}'.")
    table = to_markdown(results, header=header)
    print(table)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table)


if __name__ == "__main__":
    main()
