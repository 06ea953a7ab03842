"""Fixtures of the detection tests: a 4-block ViT/16 checkpoint and a tiny COCO-format set."""

from __future__ import annotations

from pathlib import Path

import pytest

from moca_eval.demo import save_random_moca_checkpoint
from moca_eval.detection import coco
from moca_eval.models import ArchSpec

DET_ARCH = ArchSpec(embed_dim=32, depth=4, num_heads=1, patch_size=16, img_size=64)


@pytest.fixture(scope="session")
def det_arch() -> ArchSpec:
    return DET_ARCH


@pytest.fixture(scope="session")
def det_checkpoint(tmp_path_factory) -> Path:
    """A random ViT of ``DET_ARCH`` in MOCA's checkpoint layout. Read-only."""
    return save_random_moca_checkpoint(tmp_path_factory.mktemp("det-ckpt") / "vit-p16-d4.pth", arch=DET_ARCH)


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory) -> Path:
    """4 train and 2 val images with boxes and polygon masks in COCO's layout. Read-only."""
    return coco.make_synthetic_coco(tmp_path_factory.mktemp("coco") / "coco", n_train=4, n_val=2)
