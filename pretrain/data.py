"""Unlabelled images for pretraining, reproducible two-view sampling and batch splitting.

Reproducibility does not depend on workers or processes: the views of image ``i`` in epoch
``e`` come from a generator seeded with ``(seed, e, i)``, and ``GlobalBatchSampler`` cuts
each global batch of a seeded permutation into one contiguous slice per process. A run on
``W`` processes therefore sees exactly the batches of a one-process run, and a resumed run
exactly those of an uninterrupted one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import Dataset, Sampler

from moca_eval.data import is_image, open_rgb
from moca_eval.errors import DatasetError


def find_images(data_dir: str | Path) -> list[Path]:
    """Every image under ``data_dir`` (recursively, sorted); labels/folders are never read.

    When ``data_dir/train`` exists it is used instead, as MOCA's ``--data_path`` does, so an
    ImageFolder root never leaks its ``val`` images into pretraining.

    Raises:
        DatasetError: no such directory, or no image files in it.
    """
    root = image_root(data_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such directory (expected a folder of images)")
    found = sorted(
        Path(folder) / name
        for folder, _, names in os.walk(root, followlinks=True)
        for name in names
        if is_image(name)
    )
    if not found:
        raise DatasetError(f"{root}: no image files found (looked for .jpg/.jpeg/.png/... recursively)")
    return found


def image_root(data_dir: str | Path) -> Path:
    """``data_dir/train`` when it exists (an ImageFolder root), else ``data_dir``."""
    root = Path(data_dir)
    return root / "train" if (root / "train").is_dir() else root


def view_seed(seed: int, epoch: int, index: int) -> int:
    """A distinct 63-bit seed per (seed, epoch, image)."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2**63 - 1)


class TwoViewDataset(Dataset):
    """``(view1, view2)`` of image ``i``, reproducible given ``(seed, epoch, i)``."""

    def __init__(self, paths: list[Path], transform: Callable, *, seed: int = 0) -> None:
        self.paths = paths
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = open_rgb(self.paths[index])
        if img is None:
            raise DatasetError(f"{self.paths[index]}: cannot decode image (corrupt or not an image)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(self.seed, self.epoch, index))
            return self.transform(img)


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this process's slice of each global batch of a seeded per-epoch permutation.

    Incomplete global batches are dropped. Call ``set_epoch`` before each epoch.
    """

    def __init__(self, size: int, *, global_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> None:
        if global_batch % world_size:
            raise ValueError(f"batch size {global_batch} is not divisible by {world_size} processes")
        if size < global_batch:
            raise DatasetError(f"{size} images are fewer than one batch of {global_batch}")
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self.local = global_batch // world_size
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size // self.global_batch

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.size, generator=gen).tolist()
        for step in range(len(self)):
            start = step * self.global_batch + self.rank * self.local
            yield order[start : start + self.local]
