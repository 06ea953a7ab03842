"""Training loops' data side for the trained protocols (linear probe, fine-tuning).

The runtime (device, precision, process group, seeds, batch plan, checkpoints, log) is
``moca_eval.runtime``.

- Batching: ``epoch_batches``: step ``s`` of epoch ``e`` trains on the same images
  whatever the number of processes and accumulation steps (so results and checkpoints do not
  depend on how many GPUs ran them).
- Reproducibility: every random draw is a function of (seed, epoch, step or image): the per-image
  augmentations (``SeededImageDataset``) and the per-step randomness of the main process
  (``seed_step``). An epoch therefore replays exactly after a resume, with no RNG state to save.
- Schedules: ``cosine_lr`` per optimizer step (linear warm-up, then half-cosine), applied to every
  param group as ``lr(step, group['peak_lr']) * group.get('lr_scale', 1)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from moca_eval.data import ImageDataset, ImageFolderIndex, collate_skip_bad, open_rgb
from moca_eval.errors import ConfigError, DatasetError
from moca_eval.runtime import (
    BatchPlan,
    Runtime,
    derive_seed,
    fingerprint,
    read_finished,
    seed_all,
    write_finished,
)

log = logging.getLogger(__name__)


def progress(iterable: Iterable, *, total: int, desc: str, rt: Runtime) -> Iterable:
    """tqdm on the main process when stderr is a terminal."""
    return tqdm(iterable, total=total, desc=desc, unit="step", leave=False,
                disable=None if rt.dist.is_main else True)


# ----------------------------------------------------------------------------- seeds
def seed_step(seed: int, epoch: int, step: int, micro: int, rank: int) -> None:
    """Main-process randomness of one micro-step (drop path, mixup) from its coordinates."""
    seed_all(derive_seed(seed, epoch, step, micro, rank, 1))


class SeededImageDataset(ImageDataset):
    """``ImageDataset`` whose keys are ``(row, epoch)``: each augmentation draw depends on
    (seed, epoch, row) only, not on workers, processes or what was loaded before."""

    def __init__(self, index: ImageFolderIndex, transform: Any, *, seed: int) -> None:
        super().__init__(index, transform)
        self.seed = seed

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | None, int]:
        row, epoch = key
        seed_all(derive_seed(self.seed, epoch, row, 2))
        return super().__getitem__(row)


# ----------------------------------------------------------------------------- undecodable images
class _Decodes(Dataset):
    def __init__(self, index: ImageFolderIndex) -> None:
        self.paths = [path for path, _ in index.samples]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> bool:
        return open_rgb(self.paths[i]) is not None


def drop_undecodable(index: ImageFolderIndex, *, num_workers: int, strict: bool,
                     record: Path | None = None) -> tuple[ImageFolderIndex, list[str]]:
    """``index`` without the images that cannot be decoded, and their ``class/file`` names.

    Every image is decoded once before training, so the step count, ``n_train`` and the record's
    skipped images are known up front; ``record`` (a file in the run directory) keeps the answer
    for a resume, keyed by the split's manifest.

    Raises:
        DatasetError: ``strict`` and an image cannot be decoded.
    """
    key = fingerprint("decodable", str(index.root), index.manifest_hash())
    found = read_finished(record, key) if record is not None else None
    if found is None:
        loader = DataLoader(_Decodes(index), batch_size=64, num_workers=num_workers, collate_fn=list)
        ok = [flag for batch in loader for flag in batch]
        found = {"bad_rows": [i for i, flag in enumerate(ok) if not flag]}
        if record is not None:
            write_finished(record, found, key)
    bad = [int(i) for i in found["bad_rows"]]
    names = [index.relpaths()[i] for i in bad]
    if names and strict:
        raise DatasetError(f"{index.root}: cannot decode {len(names)} image(s): {', '.join(names[:5])}")
    if names:
        log.warning("skipped %d undecodable image(s) in %s: %s", len(names), index.root,
                    ", ".join(names[:10]))
    keep = sorted(set(range(len(index))) - set(bad))
    return (index.subset(keep) if bad else index), names


# ----------------------------------------------------------------------------- batching
def steps_per_epoch(num_rows: int, plan: BatchPlan) -> int:
    """Full global batches per epoch (the last partial one is dropped)."""
    steps = num_rows // plan.global_batch
    if steps == 0:
        raise ConfigError(f"global batch {plan.global_batch} exceeds the {num_rows} training images; "
                          "lower --global-batch")
    return steps


def epoch_batches(rows: np.ndarray, plan: BatchPlan, *, seed: int, epoch: int, rank: int
                  ) -> list[list[np.ndarray]]:
    """This process's micro-batches for every step of ``epoch``: ``[step][micro] -> rows``.

    The epoch's permutation depends on (seed, epoch) only; step ``s`` covers permuted positions
    ``[s * G, (s + 1) * G)``, of which process ``r`` takes the ``r``-th contiguous slice.
    """
    gen = torch.Generator().manual_seed(derive_seed(seed, epoch, 3))
    perm = np.asarray(rows)[torch.randperm(len(rows), generator=gen).numpy()]
    local, micro = plan.local_batch, plan.micro_batch
    out = []
    for step in range(steps_per_epoch(len(rows), plan)):
        mine = perm[step * plan.global_batch + rank * local:][:local]
        out.append([mine[i * micro:(i + 1) * micro] for i in range(plan.accum)])
    return out


def image_loader(dataset: SeededImageDataset, micro_batches: Sequence[np.ndarray], *, epoch: int,
                 num_workers: int, rt: Runtime) -> DataLoader:
    """Loads the given micro-batches in order; yields ``(images, rows, bad_rows)``."""
    batches = [[(int(r), epoch) for r in mb] for mb in micro_batches]
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                      collate_fn=collate_skip_bad, pin_memory=rt.device.type == "cuda")


def grouped(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive groups of ``size`` (the accumulation micro-batches of one step)."""
    group: list = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


# ----------------------------------------------------------------------------- schedules
@dataclass(frozen=True)
class Schedule:
    """Per-step learning-rate schedule: linear warm-up from ``warmup_lr``, cosine to ``min_lr``."""

    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0
    warmup_lr: float = 0.0


def cosine_lr(step: int, peak: float, sched: Schedule) -> float:
    """The learning rate at optimizer step ``step`` (0-based) for a group peaking at ``peak``."""
    if step < sched.warmup_steps:
        return sched.warmup_lr + (peak - sched.warmup_lr) * step / sched.warmup_steps
    span = max(1, sched.total_steps - sched.warmup_steps)
    progress_ = min(1.0, (step - sched.warmup_steps) / span)
    return sched.min_lr + (peak - sched.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress_))


def apply_lr(optimizer: torch.optim.Optimizer, step: int, sched: Schedule) -> float:
    """Set every group's lr for ``step``; returns the largest."""
    top = 0.0
    for group in optimizer.param_groups:
        group["lr"] = cosine_lr(step, group["peak_lr"], sched) * group.get("lr_scale", 1.0)
        top = max(top, group["lr"])
    return top


